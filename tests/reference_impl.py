"""Slow, obvious reference implementations of the FlexLoRA math, kept in the tests.

Everything here uses plain Python floats, lists and loops (no torch), written straight from the paper's equations and
from the contracts in the package docstrings, so that the vectorised package code can be checked against it:

* `ref_entropy`: eq. 3, with the package's degenerate-case rules (rank <= 1 or all-zero λ -> 0).
* `ref_nuclear`, `ref_frobenius`: eq. 7 (Table 4 baselines), normalised by the number of singular values n.
* `ref_elem_energy_entropy`, `ref_mat_energy_entropy`: App. G eqs. 10 and 11, using |λ| as the magnitude.
* `ref_budget`: b(t) as documented in `flexlora_hf/functional/schedule.py` ("paper", "window", "constant").
* `ref_plan`: a brute-force reallocation planner implementing the rules of `flexlora_hf/functional/allocation.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


# ---------------------------------------------------------------------------------------------------- importance
def _shares(lam: Sequence[float]) -> list[float]:
    squares = [float(x) * float(x) for x in lam]
    total = 0.0
    for sq in squares:
        total += sq
    return [sq / total for sq in squares]


def _degenerate(lam: Sequence[float]) -> bool:
    return len(lam) <= 1 or all(float(x) == 0.0 for x in lam)


def _neg_sum_s_log_s(shares: Sequence[float], eps: float) -> float:
    h = 0.0
    for s in shares:
        h -= s * math.log(s + eps) if s > 0 else 0.0
    return h


def ref_entropy(lam: Sequence[float], eps: float = 1e-12) -> float:
    """Eq. 3: I = -1/log r · Σ s_i log(s_i + ε), s_i = λ_i² / Σ λ_j²; 0 for rank <= 1 or all-zero λ."""
    if _degenerate(lam):
        return 0.0
    r = len(lam)
    value = _neg_sum_s_log_s(_shares(lam), eps) / math.log(r)
    return min(1.0, max(0.0, value))


def ref_nuclear(lam: Sequence[float]) -> float:
    """Eq. 7: (1/n) Σ |λ_i| (0 for an empty spectrum)."""
    if len(lam) == 0:
        return 0.0
    total = 0.0
    for x in lam:
        total += abs(float(x))
    return total / len(lam)


def ref_frobenius(lam: Sequence[float]) -> float:
    """Eq. 7: (1/n) sqrt(Σ λ_i²) (0 for an empty spectrum)."""
    if len(lam) == 0:
        return 0.0
    total = 0.0
    for x in lam:
        total += float(x) * float(x)
    return math.sqrt(total) / len(lam)


def ref_elem_energy_entropy(lam: Sequence[float], eps: float = 1e-12) -> float:
    """Eq. 10 with |λ|: -1/(r log r) · Σ |λ_i| s_i log(s_i + ε); 0 for degenerate spectra."""
    if _degenerate(lam):
        return 0.0
    r = len(lam)
    shares = _shares(lam)
    acc = 0.0
    for x, s in zip(lam, shares, strict=True):
        if s > 0:
            acc -= abs(float(x)) * s * math.log(s + eps)
    return acc / (r * math.log(r))


def ref_mat_energy_entropy(lam: Sequence[float], eps: float = 1e-12) -> float:
    """Eq. 11 with |λ|: -1/(r log r) · (Σ |λ_i|) · Σ s_i log(s_i + ε); 0 for degenerate spectra."""
    if _degenerate(lam):
        return 0.0
    r = len(lam)
    magnitude = 0.0
    for x in lam:
        magnitude += abs(float(x))
    return magnitude * _neg_sum_s_log_s(_shares(lam), eps) / (r * math.log(r))


REF_METRICS = {
    "entropy": ref_entropy,
    "nuclear": lambda lam, eps=1e-12: ref_nuclear(lam),
    "frobenius": lambda lam, eps=1e-12: ref_frobenius(lam),
    "elem_energy_entropy": ref_elem_energy_entropy,
    "mat_energy_entropy": ref_mat_energy_entropy,
}


def ref_importance(lam: Sequence[float], metric: str, eps: float = 1e-12) -> float:
    return REF_METRICS[metric](list(lam), eps)


# ---------------------------------------------------------------------------------------------------- schedule
def ref_budget(step: int, b0: int, t_warmup: int, t_final: int, total_steps: int, schedule: str = "paper") -> int:
    """b(t) per the schedule.py docstring: 0 outside (t_warmup, T - t_final]; inside, paper / window / constant."""
    last = total_steps - t_final
    if not (t_warmup < step <= last) or b0 <= 0:
        return 0
    if schedule == "constant":
        return b0
    if schedule == "paper":
        x = b0 * (1.0 - (step - t_warmup) / (total_steps - t_final)) ** 3
    elif schedule == "window":
        x = b0 * (1.0 - (step - t_warmup) / (total_steps - t_final - t_warmup)) ** 3
    else:
        raise ValueError(schedule)
    rounded = math.floor(x + 0.5)  # round half up
    if rounded < 0:
        return 0
    if rounded > b0:
        return b0
    return int(rounded)


def ref_event_steps(
    b0: int, t_warmup: int, t_final: int, total_steps: int, delta_t: int, schedule: str = "paper"
) -> list[int]:
    """Every step in 1..T on the Δ_T grid with b(t) > 0, by brute force."""
    out = []
    for t in range(1, total_steps + 1):
        if t % delta_t == 0 and ref_budget(t, b0, t_warmup, t_final, total_steps, schedule) > 0:
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------- allocation
def ref_plan(
    scores: Mapping[str, float],
    ranks: Mapping[str, int],
    b: int,
    *,
    min_rank: int,
    max_rank: int | Mapping[str, int],
    allocation: str = "bidirectional",
    protected: tuple[str, ...] = (),
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Brute-force planner: repeatedly pick the lowest-(score, name) prunable and highest-(score, name) expandable;
    a pair moves only when the expanded matrix scores strictly higher; `protected` matrices are never pruned.

    Returns `(prune, expand)`.
    """

    def cap(name: str) -> int:
        return max_rank[name] if isinstance(max_rank, Mapping) else max_rank

    def key(name: str) -> tuple[float, str]:
        return (float(scores[name]), name)

    def lowest_prunable(excluded: list[str]) -> str | None:
        best = None
        for name in scores:
            if name in excluded or ranks[name] <= min_rank or name in protected:
                continue
            if best is None or key(name) < key(best):
                best = name
        return best

    def highest_expandable(excluded: list[str]) -> str | None:
        best = None
        for name in scores:
            if name in excluded or ranks[name] >= cap(name):
                continue
            if best is None or key(name) > key(best):
                best = name
        return best

    prune: list[str] = []
    expand: list[str] = []
    if allocation != "bidirectional" and len(set(scores.values())) <= 1:
        return (), ()  # all scores equal: nothing to choose by
    if allocation == "prune_only":
        while len(prune) < b:
            p = lowest_prunable(prune)
            if p is None:
                break
            prune.append(p)
        return tuple(prune), ()
    if allocation == "expand_only":
        while len(expand) < b:
            e = highest_expandable(expand)
            if e is None:
                break
            expand.append(e)
        return (), tuple(expand)
    while len(prune) < b:
        p = lowest_prunable(prune)
        e = highest_expandable(expand)
        if p is None or e is None:
            break
        if scores[p] >= scores[e]:  # never prune to feed an equally or less important matrix
            break
        prune.append(p)
        expand.append(e)
    return tuple(prune), tuple(expand)


# ---------------------------------------------------------------------------------------------------------- layer
def masked_forward(layer, x, *args, **kwargs):
    """The adapter computed the obvious (and slower) way the first version did: over every slot, inactive ones
    multiplied out by the mask, the scaling applied to the full output. Same parameters as `FlexLoRALayer`."""
    import torch.nn.functional as F

    result = layer.base_layer(x, *args, **kwargs)
    if layer.disabled or layer.merged:
        return result
    mask = layer.lora_active.to(layer.lora_lam.dtype)  # (R,)
    h = F.linear(layer.lora_dropout(x).to(layer.lora_Q.dtype), layer.lora_Q)  # (..., R)
    h = h * (layer.lora_lam * mask)  # (..., R)
    return result + (F.linear(h, layer.lora_P) * layer.scaling).to(result.dtype)


def masked_orth_reg(layer):
    """Eq. 2 over every slot with masked copies of P and Q and a masked identity (the first version's way)."""
    import torch

    m = layer.lora_active.to(layer.lora_P.dtype)
    P = layer.lora_P * m
    Q = layer.lora_Q * m[:, None]
    eye = torch.diag(m)
    return ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()
