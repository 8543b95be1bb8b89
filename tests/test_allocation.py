"""Reallocation planner (Algorithm 1, lines 6-9): conservation, ordering, bounds, ties, reference, errors."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impl import ref_plan

from flexlora_hf.config import ALLOCATIONS
from flexlora_hf.functional.allocation import ReallocationPlan, plan_reallocation

SETTINGS = settings(max_examples=100, deadline=None)

NAMES = [f"layers.{i}.{p}" for i in range(4) for p in ("q", "v", "mlp")]


@st.composite
def problems(draw, allocation: str | None = None):
    n = draw(st.integers(min_value=1, max_value=len(NAMES)))
    names = draw(st.permutations(NAMES))[:n]
    # few distinct score values so ties are common
    score_values = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.5, 1.0]), st.floats(min_value=-5, max_value=5))
    scores = {name: draw(score_values) for name in names}
    min_rank = draw(st.integers(min_value=0, max_value=2))
    if draw(st.booleans()):
        max_rank: int | dict[str, int] = draw(st.integers(min_value=min_rank, max_value=min_rank + 4))
        caps = {name: max_rank for name in names}
    else:
        caps = {name: draw(st.integers(min_value=min_rank, max_value=min_rank + 4)) for name in names}
        max_rank = dict(caps)
    ranks = {name: draw(st.integers(min_value=min_rank, max_value=caps[name])) for name in names}
    b = draw(st.integers(min_value=0, max_value=8))
    alloc = allocation or draw(st.sampled_from(ALLOCATIONS))
    protected = tuple(name for name in names if draw(st.integers(0, 3)) == 0)  # about a quarter in their grace period
    problem = dict(scores=scores, ranks=ranks, b=b, min_rank=min_rank, max_rank=max_rank, allocation=alloc)
    return {**problem, "protected": protected}, caps


def _plan(p: dict) -> ReallocationPlan:
    return plan_reallocation(
        p["scores"], p["ranks"], p["b"], min_rank=p["min_rank"], max_rank=p["max_rank"], allocation=p["allocation"],
        protected=p["protected"],
    )


def _apply(ranks: dict[str, int], plan: ReallocationPlan) -> dict[str, int]:
    out = dict(ranks)
    for name in plan.prune:
        out[name] -= 1
    for name in plan.expand:
        out[name] += 1
    return out


# ------------------------------------------------------------------------------------------------ properties
@SETTINGS
@given(problem=problems("bidirectional"))
def test_bidirectional_conserves_total(problem) -> None:
    p, _ = problem
    plan = _plan(p)
    assert len(plan.prune) == len(plan.expand)
    assert sum(_apply(p["ranks"], plan).values()) == sum(p["ranks"].values())


@SETTINGS
@given(problem=problems())
def test_sets_disjoint_unique_bounded(problem) -> None:
    p, caps = problem
    plan = _plan(p)
    assert not set(plan.prune) & set(plan.expand)
    assert len(set(plan.prune)) == len(plan.prune) and len(set(plan.expand)) == len(plan.expand)
    assert len(plan.prune) <= p["b"] and len(plan.expand) <= p["b"]
    assert plan.budget == p["b"]
    after = _apply(p["ranks"], plan)
    for name, rank in after.items():
        assert p["min_rank"] <= rank <= caps[name]


@SETTINGS
@given(problem=problems("bidirectional"))
def test_pruned_never_more_important_than_expanded(problem) -> None:
    p, _ = problem
    plan = _plan(p)
    s = p["scores"]
    for a in plan.prune:
        for e in plan.expand:
            assert s[a] <= s[e]
            assert (s[a], a) < (s[e], e)


@SETTINGS
@given(problem=problems())
def test_order_of_plan(problem) -> None:
    p, _ = problem
    plan = _plan(p)
    key = [(p["scores"][n], n) for n in plan.prune]
    assert key == sorted(key)  # prune in ascending importance
    key = [(p["scores"][n], n) for n in plan.expand]
    assert key == sorted(key, reverse=True)  # expand in descending importance


@SETTINGS
@given(problem=problems(), seed=st.integers(min_value=0, max_value=2**16))
def test_deterministic_under_dict_reordering(problem, seed: int) -> None:
    p, _ = problem
    names = list(p["scores"])
    random.Random(seed).shuffle(names)
    shuffled = dict(p)
    shuffled["scores"] = {n: p["scores"][n] for n in names}
    shuffled["ranks"] = {n: p["ranks"][n] for n in reversed(names)}
    if isinstance(p["max_rank"], dict):
        shuffled["max_rank"] = {n: p["max_rank"][n] for n in names}
    assert _plan(shuffled) == _plan(p)


@SETTINGS
@given(problem=problems())
def test_matches_reference_planner(problem) -> None:
    p, _ = problem
    plan = _plan(p)
    prune, expand = ref_plan(
        p["scores"], p["ranks"], p["b"], min_rank=p["min_rank"], max_rank=p["max_rank"], allocation=p["allocation"],
        protected=p["protected"],
    )
    assert plan.prune == prune
    assert plan.expand == expand


@SETTINGS
@given(problem=problems("bidirectional"))
def test_bidirectional_is_maximal(problem) -> None:
    """Fewer than b pairs only when another pair would break a rule."""
    p, caps = problem
    plan = _plan(p)
    if len(plan.prune) == p["b"]:
        return
    after = _apply(p["ranks"], plan)
    rest_p = [
        n for n in p["scores"] if n not in plan.prune and p["ranks"][n] > p["min_rank"] and n not in p["protected"]
    ]
    rest_e = [n for n in p["scores"] if n not in plan.expand and p["ranks"][n] < caps[n]]
    key = {n: (p["scores"][n], n) for n in p["scores"]}
    if rest_p and rest_e:
        lo = min(rest_p, key=key.__getitem__)
        hi = max(rest_e, key=key.__getitem__)
        assert p["scores"][lo] >= p["scores"][hi] or lo in plan.expand or hi in plan.prune
    assert all(p["min_rank"] <= after[n] <= caps[n] for n in after)


# ------------------------------------------------------------------------------------------------ examples
SCORES = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.9, "e": 0.8}
RANKS = {"a": 4, "b": 4, "c": 4, "d": 4, "e": 4}


def test_bidirectional_example() -> None:
    plan = plan_reallocation(SCORES, RANKS, 2, min_rank=1, max_rank=8)
    assert plan.prune == ("a", "b")
    assert plan.expand == ("d", "e")
    assert plan.moves == 4 and bool(plan)


def test_bidirectional_stops_when_ends_meet() -> None:
    plan = plan_reallocation(SCORES, RANKS, 10, min_rank=1, max_rank=8)
    assert plan.prune == ("a", "b")  # c is the middle: it can't be pruned to feed itself
    assert plan.expand == ("d", "e")


def test_rank_floor_and_cap_respected() -> None:
    ranks = {"a": 1, "b": 4, "c": 4, "d": 8, "e": 4}
    plan = plan_reallocation(SCORES, ranks, 1, min_rank=1, max_rank=8)
    assert plan.prune == ("b",)  # a is at min_rank
    assert plan.expand == ("e",)  # d is at its cap
    plan = plan_reallocation(SCORES, ranks, 2, min_rank=1, max_rank={"a": 8, "b": 8, "c": 8, "d": 9, "e": 4})
    assert plan.prune == ("b",)  # next pair would be (c, c): the ends meet
    assert plan.expand == ("d",)
    # only the least important matrix can grow: nothing may be pruned to feed it
    plan = plan_reallocation(SCORES, ranks, 2, min_rank=1, max_rank={"a": 8, "b": 4, "c": 4, "d": 8, "e": 4})
    assert not plan
    plan = plan_reallocation(
        SCORES, ranks, 2, min_rank=1, max_rank={"a": 8, "b": 4, "c": 4, "d": 8, "e": 4}, allocation="expand_only"
    )
    assert plan.expand == ("a",)


def test_ties_break_by_name_and_equal_scores_never_trade() -> None:
    scores = {"z": 0.9, "y": 0.5, "x": 0.5, "w": 0.1, "v": 0.1}
    plan = plan_reallocation(scores, dict.fromkeys(scores, 3), 2, min_rank=1, max_rank=5)
    assert plan.prune == ("v", "w")  # equal lowest scores: by name
    assert plan.expand == ("z", "y")  # equal second-highest: y before x (descending by name)
    flat = plan_reallocation(dict.fromkeys("abcd", 0.5), dict.fromkeys("abcd", 3), 2, min_rank=1, max_rank=5)
    assert not flat  # no information: nothing moves (where the name order would have moved two units)


def test_prune_only_and_expand_only() -> None:
    plan = plan_reallocation(SCORES, RANKS, 3, min_rank=1, max_rank=8, allocation="prune_only")
    assert plan.prune == ("a", "b", "c") and plan.expand == ()
    plan = plan_reallocation(SCORES, RANKS, 3, min_rank=1, max_rank=8, allocation="expand_only")
    assert plan.expand == ("d", "e", "c") and plan.prune == ()
    # one-sided modes do not stop at the middle and do not conserve the total
    plan = plan_reallocation(SCORES, RANKS, 10, min_rank=1, max_rank=8, allocation="prune_only")
    assert len(plan.prune) == 5
    plan = plan_reallocation(SCORES, RANKS, 10, min_rank=1, max_rank=4, allocation="expand_only")
    assert plan.expand == ()


def test_zero_budget_and_single_module() -> None:
    assert not plan_reallocation(SCORES, RANKS, 0, min_rank=1, max_rank=8)
    plan = plan_reallocation({"only": 0.5}, {"only": 3}, 4, min_rank=1, max_rank=8)
    assert plan == ReallocationPlan(budget=4)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        plan_reallocation({"a": bad, "b": 0.1}, {"a": 2, "b": 2}, 1, max_rank=4)


def test_mismatched_keys_rejected() -> None:
    with pytest.raises(ValueError, match="same modules"):
        plan_reallocation({"a": 0.1, "b": 0.2}, {"a": 2, "c": 2}, 1, max_rank=4)


def test_bad_allocation_rejected() -> None:
    with pytest.raises(ValueError, match="sideways"):
        plan_reallocation({"a": 0.1}, {"a": 2}, 1, max_rank=4, allocation="sideways")


def test_negative_budget_rejected() -> None:
    with pytest.raises(ValueError, match="budget"):
        plan_reallocation({"a": 0.1}, {"a": 2}, -1, max_rank=4)


def test_missing_cap_entry_rejected() -> None:
    with pytest.raises(ValueError, match="'b'"):
        plan_reallocation({"a": 0.1, "b": 0.9}, {"a": 2, "b": 2}, 1, max_rank={"a": 4})


def test_plan_is_immutable() -> None:
    plan = plan_reallocation(SCORES, RANKS, 1, min_rank=1, max_rank=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.prune = ("c",)  # type: ignore[misc]
    assert isinstance(plan.prune, tuple) and isinstance(plan.expand, tuple)
    assert hash(plan) == hash(ReallocationPlan(prune=("a",), expand=("d",), budget=1))


def test_budget_beyond_the_modules_is_clamped() -> None:
    # Paper §4.2 clamps b(t) to the modules available; the planner does it by stopping when candidates run out, so
    # FlexLoRAConfig.validate(n_modules=...) only warns about a large b0 (tests/test_config.py).
    plan = plan_reallocation(SCORES, RANKS, 1000, min_rank=1, max_rank=8)
    assert len(plan.prune) == len(plan.expand) == len(SCORES) // 2 and plan.budget == 1000
    plan = plan_reallocation(SCORES, RANKS, 1000, min_rank=1, max_rank=8, allocation="prune_only")
    assert sorted(plan.prune) == sorted(SCORES)
    plan = plan_reallocation(SCORES, RANKS, 1000, min_rank=1, max_rank=8, allocation="expand_only")
    assert sorted(plan.expand) == sorted(SCORES)
    assert plan_reallocation({"x": 1.0, "y": 2.0}, {"x": 2, "y": 2}, 10**9, max_rank=4).moves == 2


@pytest.mark.parametrize("bad", [1.0, True, "2"])
def test_non_integer_budget_rejected(bad) -> None:
    with pytest.raises(ValueError, match=r"budget b=.* must be an integer"):
        plan_reallocation(SCORES, RANKS, bad, min_rank=1, max_rank=8)


@SETTINGS
@given(problem=problems())
def test_protected_matrices_are_never_pruned_and_moves_follow_strict_importance(problem) -> None:
    p, _ = problem
    plan = _plan(p)
    assert not set(plan.prune) & set(p["protected"])
    if p["allocation"] == "bidirectional":
        for pruned, grown in zip(plan.prune, plan.expand, strict=True):
            assert p["scores"][pruned] < p["scores"][grown]


@SETTINGS
@given(problem=problems(), value=st.sampled_from([0.0, 0.5, 1.0]))
def test_scores_without_information_move_nothing(problem, value) -> None:
    # all 0 (e.g. P = 0 at an early event) or all equal: no tie-break by module name may move rank
    p, _ = problem
    plan = _plan({**p, "scores": dict.fromkeys(p["scores"], value)})
    assert not plan
