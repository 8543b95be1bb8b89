"""Matrix-level importance scores (pure functions on singular values; no nn.Module, no Trainer).

The inputs are each matrix's real singular values, those of its active ΔW (`spectrum.factored_singular_values`,
via `FlexLoRALayer.spectrum`), never raw λ: λ equals the spectrum only when P and Q are orthonormal.

Owns eq. 3 (normalised spectral entropy), the norm baselines of eq. 7 (Table 4) and the energy-weighted entropy
variants of App. G (eqs. 10-11). Every metric works on the *active* singular values of one matrix; the batched form
scores all matrices of a model in one vectorised call (a padded (M, R) tensor plus an active mask) so a reallocation
event costs one host sync, not one per module.

Degenerate cases (the paper's formula is 0/0 there; the authors' code returns NaN, which ``topk`` ranks *largest*):

* **rank <= 1**: the spectrum is concentrated on a single component, the limit App. B names as I -> 0, so the score is
  **0**. Consequence: a rank-1 matrix is the least important candidate for expansion and grows again only when the
  plan runs out of higher-scoring expandable matrices; with ``min_rank=1`` it can no longer be pruned either, so it
  stays at rank 1 (it still trains). The authors' NaN instead made every rank-1 matrix grow at the next event.
* **all active λ = 0** (e.g. right after initialisation, before λ has trained): no spectral information, score **0**.

Magnitudes are taken as |x|, so signed λ (the paper's notation, and the tests' inputs) score as their spectrum would.
"""

from __future__ import annotations

import math

import torch

from ..config import IMPORTANCE_METRICS
from ..constants import ENTROPY_EPS


def _as_batch(lam: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    lam = lam.detach().to(torch.float64 if lam.device.type == "cpu" else torch.float32)
    if mask is None:
        mask = torch.ones_like(lam, dtype=torch.bool)
    return lam, mask.to(torch.bool)


def _entropy_terms(lam: torch.Tensor, mask: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (H, n): -Σ s_i log(s_i + ε) over active entries, and the active count, per row."""
    sq = torch.where(mask, lam * lam, torch.zeros_like(lam))  # (M, R)
    total = sq.sum(-1, keepdim=True)  # (M, 1)
    s = sq / total.clamp_min(torch.finfo(sq.dtype).tiny)  # (M, R); 0 where the row is all-zero
    H = -(s * torch.log(s + eps)).sum(-1)  # (M,)
    n = mask.sum(-1).to(lam.dtype)  # (M,)
    return H, n


def importance_batched(
    lam: torch.Tensor, mask: torch.Tensor | None = None, *, metric: str = "entropy", eps: float = ENTROPY_EPS
) -> torch.Tensor:
    """Score M matrices at once.

    Args:
        lam (`torch.Tensor` of shape `(M, R)`): singular values, padded; inactive slots are ignored.
        mask (`torch.Tensor` of shape `(M, R)`, *optional*): `True` where a slot is active.
        metric (`str`): one of `entropy` (eq. 3), `nuclear`, `frobenius` (eq. 7), `elem_energy_entropy` (eq. 10),
            `mat_energy_entropy` (eq. 11).
        eps (`float`): the ε of eq. 3.

    Returns:
        `torch.Tensor` of shape `(M,)`, never NaN (degenerate rows score 0, see the module docstring).
    """
    if metric not in IMPORTANCE_METRICS:
        raise ValueError(f"Unknown importance metric {metric!r}; choose one of {', '.join(IMPORTANCE_METRICS)}.")
    if lam.dim() != 2:
        raise ValueError(f"importance_batched expects lam of shape (M, R), got {tuple(lam.shape)}.")
    lam, mask = _as_batch(lam, mask)
    mag = torch.where(mask, lam.abs(), torch.zeros_like(lam))  # (M, R)
    n = mask.sum(-1).to(lam.dtype)  # (M,)
    n_safe = n.clamp_min(1.0)
    if metric == "nuclear":
        return mag.sum(-1) / n_safe
    if metric == "frobenius":
        return torch.sqrt((mag * mag).sum(-1)) / n_safe
    H, _ = _entropy_terms(lam, mask, eps)
    log_n = torch.log(n.clamp_min(2.0))  # log r, guarded; rows with n <= 1 are zeroed below
    degenerate = (n <= 1) | ((mag * mag).sum(-1) == 0)
    if metric == "entropy":
        score = (H / log_n).clamp(0.0, 1.0)
    elif metric == "elem_energy_entropy":
        sq = mag * mag
        s = sq / sq.sum(-1, keepdim=True).clamp_min(torch.finfo(sq.dtype).tiny)
        score = -(mag * s * torch.log(s + eps)).sum(-1) / (n_safe * log_n)
    else:  # mat_energy_entropy
        score = mag.sum(-1) * H / (n_safe * log_n)
    return torch.where(degenerate, torch.zeros_like(score), score)


def spectral_entropy(lam: torch.Tensor, *, eps: float = ENTROPY_EPS) -> float:
    """Normalised spectral entropy of eq. 3 over the given (active) singular values, in [0, 1].

    `I(Λ) = -1/log r · Σ s_i log(s_i + ε)`, `s_i = λ_i² / Σ_j λ_j²`. It is 1 for a uniform spectrum, tends to 0 as
    the energy concentrates on one direction, is invariant to permutation and to scaling of λ, and is 0 (never NaN)
    for rank <= 1 or an all-zero λ.

    Args:
        lam (`torch.Tensor` of shape `(r,)`): the active singular values of one matrix.
        eps (`float`): the ε of eq. 3.
    """
    lam = torch.as_tensor(lam).reshape(1, -1)
    return float(importance_batched(lam, metric="entropy", eps=eps)[0])


def importance(lam: torch.Tensor, *, metric: str = "entropy", eps: float = ENTROPY_EPS) -> float:
    """Any supported metric for one matrix's active singular values (see `importance_batched`)."""
    lam = torch.as_tensor(lam).reshape(1, -1)
    return float(importance_batched(lam, metric=metric, eps=eps)[0])


def random_scores(names: list[str], seed: int, step: int) -> dict[str, float]:
    """The `importance="random"` control: uniform scores in [0, 1) drawn from (seed, step), the same on every
    process, so an event moves as many units as b(t) allows but chooses the matrices by chance."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) + 17) % (2**63 - 1))
    values = torch.rand(len(names), generator=g, dtype=torch.float64).tolist()
    return dict(zip(names, values, strict=True))


def max_entropy(r: int) -> float:
    """Unnormalised maximum of the spectral entropy, log r (App. B)."""
    return math.log(r) if r > 1 else 0.0
