"""Allocation planning for one reallocation event (Algorithm 1, lines 6-9), as a pure function.

`plan_reallocation` takes importance scores and current ranks (plain mappings) and returns an immutable
`ReallocationPlan` naming the matrices that lose their smallest-|λ| direction and those that gain a new one. It never
touches tensors; `FlexLoRAModel.apply_plan` is the one seam where a plan meets the parameters.

Rules (bidirectional, the paper's default):

* Candidates for pruning have ``rank > min_rank``; for expansion ``rank < cap``. All matrices are put in one total
  order by ``(score, name)``, so ties break by module path, deterministically on every process.
* Pairs are taken from both ends of that order: the least important prunable matrix with the most important
  expandable one, then the next pair, up to ``b`` pairs. We stop at the first pair whose expanded matrix is not
  *strictly* more important than the pruned one, so a matrix is never in both sets, never pruned to feed a less or
  equally important one, and scores that carry no information (all equal, e.g. all 0 at an early event) move
  nothing, where a tie-break by module name would move rank by name. The total active rank is therefore
  conserved exactly (``len(prune) == len(expand)``); with few modules fewer than ``b`` pairs may be possible.
  (The paper says "identify the b least / most important"; it does not say what happens when those sets overlap.)
* ``protected`` matrices (those inside their grace period after an expansion, `FlexLoRAConfig.grace_events`) are
  not pruned; they may still grow. Departure from the paper (which has no grace period): a new zero-impact direction
  lowers its matrix's normalised entropy by construction, which would otherwise make it the next prune target.
* ``prune_only`` / ``expand_only`` (Table 5 ablations) take up to ``b`` from one end and do not conserve the total.
* A budget larger than the moves available is clamped, as the paper clamps b(t) to the modules available (§4.2):
  at most ⌊n/2⌋ pairs (bidirectional) or n moves (one-sided) for n matrices, fewer when ranks sit at their bounds.
  `FlexLoRAConfig.validate(n_modules=...)` warns once when b0 exceeds that; the plan's `budget` keeps the b asked.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ..choices import ALLOCATIONS, is_integer


@dataclass(frozen=True)
class ReallocationPlan:
    """Immutable outcome of one event: module paths that lose one direction (`prune`) and that gain one (`expand`)."""

    prune: tuple[str, ...] = ()
    expand: tuple[str, ...] = ()
    budget: int = 0

    @property
    def moves(self) -> int:
        return len(self.prune) + len(self.expand)

    def __bool__(self) -> bool:
        return self.moves > 0


def _cap(max_rank: int | Mapping[str, int], name: str) -> int:
    if isinstance(max_rank, Mapping):
        if name not in max_rank:
            raise ValueError(f"plan_reallocation: max_rank has no entry for module {name!r}.")
        return int(max_rank[name])
    return int(max_rank)


def plan_reallocation(
    scores: Mapping[str, float],
    ranks: Mapping[str, int],
    b: int,
    *,
    min_rank: int = 1,
    max_rank: int | Mapping[str, int],
    allocation: str = "bidirectional",
    protected: Collection[str] = (),
) -> ReallocationPlan:
    """Plan one reallocation event.

    Args:
        scores (`Mapping[str, float]`): module path -> importance (higher = more important). Must be finite.
        ranks (`Mapping[str, int]`): module path -> current active rank; same keys as `scores`.
        b (`int`): budget b(t) for this event (number of prunes and of expansions, at most); a b larger than the
            moves available is clamped (see the module docstring).
        min_rank (`int`): no matrix goes below this rank.
        max_rank (`int` or `Mapping[str, int]`): per-module cap; no matrix goes above it.
        allocation (`str`): `"bidirectional"`, `"prune_only"` or `"expand_only"`.
        protected (`Collection[str]`): modules that must not be pruned at this event (they may expand).

    Returns:
        `ReallocationPlan` with `prune` in ascending and `expand` in descending importance order.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"Unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}.")
    if set(scores) != set(ranks):
        missing = sorted(set(scores) ^ set(ranks))
        raise ValueError(f"plan_reallocation: scores and ranks must have the same modules; mismatch: {missing[:5]}.")
    bad = [n for n, s in scores.items() if not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"plan_reallocation: non-finite importance for {bad[:5]}; scores must be finite.")
    if not is_integer(b) or b < 0:
        raise ValueError(f"plan_reallocation: budget b={b!r} must be an integer >= 0.")

    order = sorted(scores, key=lambda n: (float(scores[n]), n))  # ascending importance, ties by name
    keep = set(protected)
    prunable = [n for n in order if ranks[n] > min_rank and n not in keep]
    expandable = [n for n in reversed(order) if ranks[n] < _cap(max_rank, n)]

    if allocation != "bidirectional" and len({float(v) for v in scores.values()}) <= 1:
        return ReallocationPlan(budget=b)  # no information to choose by (bidirectional: the strict rule below)
    if allocation == "prune_only":
        return ReallocationPlan(prune=tuple(prunable[:b]), budget=b)
    if allocation == "expand_only":
        return ReallocationPlan(expand=tuple(expandable[:b]), budget=b)

    position = {n: i for i, n in enumerate(order)}
    prune: list[str] = []
    expand: list[str] = []
    for p, e in zip(prunable, expandable, strict=False):
        if len(prune) == b or position[p] >= position[e] or not float(scores[p]) < float(scores[e]):
            break
        prune.append(p)
        expand.append(e)
    return ReallocationPlan(prune=tuple(prune), expand=tuple(expand), budget=b)
