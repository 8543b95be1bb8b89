"""Drawing directions: Gaussian vectors, orthonormal bases and Gram-Schmidt against the active directions.

Pure torch on the CPU with an explicit generator, so every process of a distributed run draws the same vectors.
"""

from __future__ import annotations

import torch


def gaussian_direction(
    d_out: int, d_in: int, std: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one (P column (out,), Q row (in,)) pair ~ N(0, std²) on the CPU (same draw on every device/process)."""
    p = torch.randn(d_out, generator=generator, dtype=torch.float32) * std  # (out,)
    q = torch.randn(d_in, generator=generator, dtype=torch.float32) * std  # (in,)
    return p, q


def orthonormal_basis(d: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """`r` orthonormal columns in R^d (d, r): QR of a Gaussian draw on the CPU, signs fixed so the draw is unique."""
    G = torch.randn(d, r, generator=generator, dtype=torch.float64)  # (d, r)
    Qb, R = torch.linalg.qr(G)  # (d, r), (r, r)
    return (Qb * torch.sign(torch.diagonal(R)).clamp_min(0).mul(2).sub(1)).float()  # (d, r)


def orthogonalize(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt `v` (d,) against the columns of `basis` (d, k), then restore `v`'s original norm."""
    if basis.numel() == 0 or basis.shape[1] >= basis.shape[0]:
        return v
    Qb, _ = torch.linalg.qr(basis.double())  # (d, k) orthonormal span of the active directions
    w = v.double() - Qb @ (Qb.T @ v.double())  # (d,)
    w = w * (v.norm() / w.norm().clamp_min(1e-30))
    return w.to(v.dtype)
