"""Gradient-aligned initial directions: the orthonormal basis rotated onto the first batch's weight-gradient subspace.

Owns `align_to_gradient` (and `is_fresh`, the test for "nothing trained yet"). Opt-in via
`FlexLoRAConfig.init_from_gradient`; `FlexLoRATrainer` calls it on the first micro-batch of a fresh run.

Why. With λ = 0 (the zero-impact start), ∂L/∂P = s·G Qᵀ diag(λ) and ∂L/∂Q = s·diag(λ) Pᵀ G are exactly zero, so only
λ learns at first, and λ_i's gradient is the projection s·p_iᵀ G q_i of the weight gradient G (out, in) onto a
*random* pair of unit vectors: about ||G|| / sqrt(d_out d_in) for a low-rank G. P and Q start rotating towards G only
once λ has grown, so the useful part of ΔW grows like t² at first, while LoRA's B (zero at start) follows G Aᵀ from
step one (like t). On SmolLM2-135M at LoRA's rate this shows as a slow start (train loss 2.1 vs LoRA's 0.35 at step
14, docs/benchmarks.md). Rotating P and Q onto G's top-r singular vectors before the first update keeps λ = 0 (the
model's output is unchanged, bit for bit) and eq. 2 = 0 (the basis stays orthonormal), and makes λ_i's first
gradient s·σ_i(G): the largest available.

How, without ever forming G (a 4-bit base has no weight gradient; at LLaMA3-8B shapes G is 235 MB per matrix):
with λ set to a tiny ε on the active slots, one backward pass gives ∂L/∂P = s·ε·G Qᵀ and the next ∂L/∂Q = s·ε·Pᵀ G,
the two halves of a randomized range finder (Halko, Martinsson & Tropp 2011). Pass 1 with the random orthonormal
Q gives P₁ = orth(G Qᵀ) (out, r); pass 2 gives B = P₁ᵀ G (r, in), and the SVD B = U S Vᵀ yields P = P₁ U, Q = Vᵀ.
Further passes alternate sides (power iterations). The ε-perturbation of the forward (s·ε·P Q x, ε = 1e-4 against
|λ| ~ 1e-2 after a few steps) moves G by O(ε): negligible. Cost: `passes` extra forward/backward passes on one
batch, once. LoRA-GA (Wang et al. 2024) initialises LoRA from the gradient's SVD in the same spirit; here the
factors stay orthonormal and λ = 0, so the start is still exactly the base model. The paper does not specify P, Q's
initialisation (departure: a documented option, off by default, measured in docs/benchmarks.md).

Distributed: each layer's projected gradient is all-reduced (so the basis comes from the global batch even inside
a `no_sync` micro-batch), and process 0's result is broadcast, so every process holds the same basis. FSDP2-sharded
adapters are refused (not implemented). Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .sharding import uses_fsdp2

#: λ on the active slots during the probe passes: large enough for a representable gradient, small enough that
#: the probe's forward equals the base model's to O(1e-4) relative.
PROBE_LAMBDA = 1e-4


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_fresh(model: Any) -> bool:
    """Whether no direction of `model` (a `FlexLoRAModel`) has been trained yet: every active λ is exactly 0."""
    return all(not bool(layer.lora_lam.detach()[: layer.rank].any()) for _, layer in model.flexlora_layers())


def _orthonormal_columns(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of `A` (d, r), float64, signs fixed by R's diagonal (deterministic)."""
    Qb, R = torch.linalg.qr(A)  # (d, r), (r, r)
    return Qb * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Qb.dtype)  # (d, r)


def _projected_gradient(layer: Any, side: str) -> torch.Tensor | None:
    """This pass's (d, r) gradient of P (side "P": ∝ G Qᵀ) or Qᵀ (side "Q": ∝ Gᵀ P), float64, summed over
    processes; None where the layer got no gradient (not in the graph, e.g. an MoE expert without tokens)."""
    r = layer.rank
    grad = layer.lora_P.grad if side == "P" else layer.lora_Q.grad
    g = None if grad is None else (grad[:, :r] if side == "P" else grad[:r].T)  # (out, r) or (in, r)
    g = torch.zeros(0) if g is None else g.detach().to(torch.float64).contiguous()
    if _distributed():
        # Every process must join the same all-reduces: a missing gradient contributes zeros of the right shape.
        if g.numel() == 0:
            d = layer.out_features if side == "P" else layer.in_features
            g = torch.zeros(d, r, dtype=torch.float64, device=layer.lora_P.device)
        dist.all_reduce(g)  # a sum: the basis is scale-free
    return g if g.numel() and bool(g.any()) else None


def align_to_gradient(model: Any, loss_fn: Callable[[], torch.Tensor], *, passes: int = 2) -> dict[str, int]:
    """Rotate every active basis of a fresh `model` onto the top singular subspace of its weight gradient.

    Call once, before the first optimizer step, with a closure that runs the model on a training batch and returns
    the loss (the Trainer uses the first micro-batch). The model's output is unchanged (λ stays 0) and each P, Q stays
    orthonormal; only the directions move. Gradients already on the adapter parameters are restored afterwards.

    Args:
        model (`FlexLoRAModel`): a fresh model (every active λ is 0; see `is_fresh`) with the orthonormal basis.
        loss_fn (`Callable[[], torch.Tensor]`): runs a forward pass in training mode and returns a scalar loss. It
            is called `passes` times; the batch should be the same each time.
        passes (`int`, *optional*, defaults to 2): backward passes; 2 is one randomized range finder, each extra
            pass one more (half) power iteration.

    Returns:
        `dict[str, int]`: ``{"aligned": layers rotated, "skipped": layers without a gradient (kept as drawn)}``.
    """
    if passes < 2:
        raise ValueError(f"align_to_gradient: passes={passes} must be >= 2 (one range-finder pass per side).")
    named = [(n, layer) for n, layer in model.flexlora_layers() if layer.rank > 0]
    layers = [layer for _, layer in named]
    if uses_fsdp2(model, layers):
        raise NotImplementedError(
            "align_to_gradient: FSDP2-sharded adapters are not supported; set init_from_gradient=False (the "
            "orthonormal random basis) or align before fully_shard."
        )
    wrong = [(n, layer.init_basis) for n, layer in named if layer.init_basis != "orthonormal"]
    if wrong:
        raise ValueError(f"align_to_gradient needs init_basis='orthonormal'; {wrong[0][0]} uses {wrong[0][1]!r}.")
    if not is_fresh(model):
        raise ValueError(
            "align_to_gradient: the adapter has already been trained (some active λ is non-zero); rotating its "
            "directions now would change the model. Call it once, before the first optimizer step."
        )
    params = [p for layer in layers for p in (layer.lora_P, layer.lora_lam, layer.lora_Q)]
    saved = [p.grad for p in params]
    done: set[int] = set()
    try:
        for k in range(passes):
            side = "P" if k % 2 == 0 else "Q"
            for p in params:
                p.grad = None
            with torch.no_grad():
                for layer in layers:
                    layer.lora_lam[: layer.rank] = PROBE_LAMBDA
            try:
                loss_fn().backward()
            finally:
                with torch.no_grad():
                    for layer in layers:
                        layer.lora_lam[: layer.rank] = 0.0  # exactly zero again, whatever happened
            for i, layer in enumerate(layers):
                g = _projected_gradient(layer, side)  # (out, r) or (in, r)
                if g is None:
                    continue
                done.add(i)
                _update_basis(layer, side, g, last=k == passes - 1)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    if _distributed():
        for layer in layers:  # identical already up to LAPACK nondeterminism; make it exact
            r = layer.rank
            with torch.no_grad():
                P, Q = layer.lora_P[:, :r].contiguous(), layer.lora_Q[:r].contiguous()  # (out, r), (r, in)
                dist.broadcast(P, src=0)
                dist.broadcast(Q, src=0)
                layer.lora_P[:, :r] = P
                layer.lora_Q[:r] = Q
    model.gradient_aligned = True
    return {"aligned": len(done), "skipped": len(layers) - len(done)}


@torch.no_grad()
def _update_basis(layer: Any, side: str, g: torch.Tensor, *, last: bool) -> None:
    """One half-iteration: replace P (side "P") or Q (side "Q") by an orthonormal basis of `g`; on the last pass
    also diagonalise the (r, r) core so that the pairs (p_i, q_i) are G's singular pairs (SVD of the projection)."""
    r = layer.rank
    P = layer.lora_P[:, :r].to(torch.float64)  # (out, r)
    Q = layer.lora_Q[:r].to(torch.float64)  # (r, in)
    if not last:
        if side == "P":
            P = _orthonormal_columns(g)  # (out, r): range of G Qᵀ
        else:
            Q = _orthonormal_columns(g).T  # (r, in): row space of Pᵀ G
    elif side == "P":  # g ∝ G Qᵀ = U S Vh  =>  G Qᵀ Q = U S (Vh Q)
        U, _, Vh = torch.linalg.svd(g, full_matrices=False)  # (out, r), (r,), (r, r)
        P, Q = U, Vh @ Q  # (out, r), (r, in)
    else:  # g ∝ Gᵀ P, i.e. Pᵀ G = gᵀ = U S Vh  =>  P Pᵀ G = (P U) S Vh
        U, _, Vh = torch.linalg.svd(g.T, full_matrices=False)  # (r, r), (r,), (r, in)
        P, Q = P @ U, Vh  # (out, r), (r, in)
    layer.lora_P[:, :r] = P.to(layer.lora_P.dtype)
    layer.lora_Q[:r] = Q.to(layer.lora_Q.dtype)
