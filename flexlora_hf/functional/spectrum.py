"""The spectrum of a factored update ΔW = P·diag(λ)·Q, exactly, without forming ΔW (pure functions on tensors).

Eq. 3 and Algorithm 1 talk about the singular values of each matrix's update. λ is that spectrum only when P's
columns and Q's rows are orthonormal, which eq. 2 encourages but never enforces, and which the default `lora_like`
start (P = 0) is far from. So every importance score and every pruning decision goes through this module:

* `factored_svd(P, lam, Q)`: the thin SVD of P·diag(λ)·Q from two thin QR factorisations, P = Q_P R_P and
  Qᵀ = Q_Q R_Q, and one r x r SVD of the core R_P·diag(λ)·R_Qᵀ = U_c Σ V_cᵀ; then ΔW = (Q_P U_c) Σ (Q_Q V_c)ᵀ.
  Cost O((d_out + d_in) r²) plus O(r³), never O(d_out d_in). Exact in exact arithmetic whatever P and Q are
  (collinear, zero, unnormalised columns included), in float64.
* `factored_singular_values(P, lam, Q)`: Σ alone (what eq. 3 needs), exact, through the same QRs.
* `gram_singular_values(P, lam, Q)`: Σ alone, fast, what every event uses to score all matrices: with the Gram
  matrices G_P = PᵀP and G_Q = QQᵀ (one GEMM each, in P's precision, at least float32) and their square roots
  S = G^{1/2} (r x r eigh, float64), P·diag(λ)·Q and S_P·diag(λ)·S_Q have the same singular values (polar
  decompositions P = U_P S_P, Q = S_Q V_Q with isometric U_P, V_Q). Each σ² is exact up to ~ε·σ_max² (ε of the
  GEMM's dtype), far below what eq. 3's shares s_i = σ_i² / Σσ² can resolve; 5-15x cheaper than the QRs at
  LLaMA3-8B shapes (benchmarks.event_cost).

Pure torch, no nn.Module: `FlexLoRALayer.spectrum` and `FlexLoRALayer.rotate_to_svd` call these on their active
prefix; `tests/reference_impl.py` checks them against `torch.linalg.svdvals` of the dense product.
"""

from __future__ import annotations

import torch


def _core(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_P (out, r), core (r, r), Q_Q (in, r)) with P·diag(λ)·Q = Q_P · core · Q_Qᵀ, in float64."""
    P64 = P.detach().to(torch.float64)  # (out, r)
    lam64 = lam.detach().to(torch.float64)  # (r,)
    Q64 = Q.detach().to(torch.float64)  # (r, in)
    QP, RP = torch.linalg.qr(P64)  # (out, r), (r, r): reduced QR; columns of QP orthonormal even if P is rank-deficient
    QQ, RQ = torch.linalg.qr(Q64.T)  # (in, r), (r, r)
    core = (RP * lam64) @ RQ.T  # (r, r) = R_P diag(λ) R_Qᵀ
    return QP, core, QQ


def factored_singular_values(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Singular values of P·diag(λ)·Q, descending (r,), float64.

    Args:
        P (`torch.Tensor` of shape `(out, r)`), lam (`torch.Tensor` of shape `(r,)`), Q (`torch.Tensor` of shape
            `(r, in)`): one matrix's active directions; `r <= min(out, in)`.
    """
    r = int(lam.shape[0])
    if r == 0:
        return torch.zeros(0, dtype=torch.float64, device=lam.device)
    _, core, _ = _core(P, lam, Q)
    return torch.linalg.svdvals(core)  # (r,)


def _gram_sqrt(G: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root of an (r, r) Gram matrix, float64 (negative rounding eigenvalues clipped to 0)."""
    e, V = torch.linalg.eigh(G.to(torch.float64))  # (r,), (r, r)
    return (V * e.clamp_min(0).sqrt()) @ V.T  # (r, r)


def gram_singular_values(P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Singular values of P·diag(λ)·Q from the two (r, r) Gram matrices, descending (r,), float64 (see the module
    docstring for the identity and its precision)."""
    r = int(lam.shape[0])
    if r == 0:
        return torch.zeros(0, dtype=torch.float64, device=lam.device)
    dtype = torch.promote_types(P.dtype, torch.float32)  # never a bf16 GEMM
    P = P.detach().to(dtype)  # (out, r)
    Q = Q.detach().to(dtype)  # (r, in)
    S_P, S_Q = _gram_sqrt(P.T @ P), _gram_sqrt(Q @ Q.T)  # (r, r) each
    return torch.linalg.svdvals((S_P * lam.detach().to(torch.float64)) @ S_Q)  # (r,)


def factored_svd(
    P: torch.Tensor, lam: torch.Tensor, Q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of P·diag(λ)·Q: `U` (out, r) orthonormal columns, `S` (r,) descending, `Vh` (r, in) orthonormal rows,
    all float64, with `U diag(S) Vh == P diag(λ) Q` up to rounding."""
    r = int(lam.shape[0])
    if r == 0:
        z = torch.zeros(0, dtype=torch.float64, device=lam.device)
        return P.new_zeros(P.shape[0], 0, dtype=torch.float64), z, Q.new_zeros(0, Q.shape[1], dtype=torch.float64)
    QP, core, QQ = _core(P, lam, Q)
    Uc, S, Vch = torch.linalg.svd(core)  # (r, r), (r,), (r, r)
    return QP @ Uc, S, Vch @ QQ.T  # (out, r), (r,), (r, in)


def truncation_error(S: torch.Tensor, keep: int) -> float:
    """Frobenius error of the best rank-`keep` approximation (Eckart-Young): sqrt of the sum of the dropped σ²."""
    return float(S[keep:].double().square().sum().sqrt())
