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


LORA_LIKE_LAMBDA = 3.0**-0.5  # norm of a PEFT LoRA A row (Kaiming-uniform, a = sqrt(5): var 1 / (3 d_in))


def initial_directions(
    d_out: int, d_in: int, r: int, basis: str, init_scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's first `r` directions for `init_basis`: `P` (out, r), `lam` (r,), `Q` (r, in), ΔW = 0 exactly.

    `orthonormal` and `gaussian`: λ = 0 (the paper's zero impact). `lora_like`: PEFT LoRA's start in SVD form,
    P = 0 playing B = 0 and λ·Q playing the Kaiming-uniform A (rows of norm 1/sqrt(3)), so P learns from step one
    as B does, where with λ = 0 P and Q get no gradient until λ has moved.
    """
    if basis == "orthonormal":
        return orthonormal_basis(d_out, r, generator), torch.zeros(r), orthonormal_basis(d_in, r, generator).T
    if basis == "lora_like":
        return torch.zeros(d_out, r), torch.full((r,), LORA_LIKE_LAMBDA), orthonormal_basis(d_in, r, generator).T
    pairs = [gaussian_direction(d_out, d_in, init_scale, generator) for _ in range(r)]  # p then q, slot by slot
    P = torch.stack([p for p, _ in pairs], 1) if pairs else torch.zeros(d_out, 0)  # (out, r)
    Q = torch.stack([q for _, q in pairs]) if pairs else torch.zeros(0, d_in)  # (r, in)
    return P, torch.zeros(r), Q


def orthogonalize(v: torch.Tensor, basis: torch.Tensor, *, near_orthonormal: bool = False) -> torch.Tensor:
    """Remove from `v` (d,) its component in the span of the columns of `basis` (d, k); keep `v`'s norm.

    `near_orthonormal=True` (the orthonormal basis, which eq. 2 keeps close to orthonormal): three passes of
    classical Gram-Schmidt against the normalised columns, O(d k) each (the iteration w <- w - B Bᵀ w converges to
    the orthogonal complement when BᵀB is close to I, to machine precision for an orthonormal B). Otherwise (any
    basis, e.g. the Gaussian one): an exact projection through a float64 QR, O(d k²), which dominated an event's
    cost at LLaMA3-8B shapes (d = 14336).
    """
    if basis.numel() == 0 or basis.shape[1] >= basis.shape[0]:
        return v
    if near_orthonormal:  # in the basis' own precision (float32 is enough: orthogonal to ~1e-7)
        Bt = basis.T.contiguous()  # (k, d): rows contiguous (P's columns are strided in (out, R))
        Bt = Bt / Bt.norm(dim=1, keepdim=True).clamp_min(1e-30)
        w = v.to(Bt.dtype)  # (d,)
        for _ in range(3):
            w = w - Bt.T @ (Bt @ w)
    else:
        Qb, _ = torch.linalg.qr(basis.double())  # (d, k) orthonormal span of the active directions
        w = v.double() - Qb @ (Qb.T @ v.double())
    w = w * (v.norm() / w.norm().clamp_min(1e-30))
    return w.to(v.dtype)
