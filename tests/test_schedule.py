"""Budget b(t) (eq. 4) and the event grid: window edges, curves, monotonicity, brute force and reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impl import ref_budget, ref_event_steps

from flexlora_hf.config import SCHEDULES
from flexlora_hf.functional.schedule import budget_at, event_steps, is_event_step

SETTINGS = settings(max_examples=80, deadline=None)

TYPICAL = dict(b0=4, t_warmup=500, t_final=500, total_steps=3000)


@st.composite
def schedules(draw):
    b0 = draw(st.integers(min_value=0, max_value=8))
    t_warmup = draw(st.integers(min_value=0, max_value=300))
    t_final = draw(st.integers(min_value=0, max_value=300))
    total = t_warmup + t_final + draw(st.integers(min_value=1, max_value=400))
    delta_t = draw(st.integers(min_value=1, max_value=60))
    schedule = draw(st.sampled_from(SCHEDULES))
    return dict(b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total, delta_t=delta_t, schedule=schedule)


def _budget_kwargs(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "delta_t"}


# ------------------------------------------------------------------------------------------------ window edges
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_window_edges(schedule: str) -> None:
    kw = dict(TYPICAL, schedule=schedule)
    T, tw, tf = kw["total_steps"], kw["t_warmup"], kw["t_final"]
    assert budget_at(0, **kw) == 0
    assert budget_at(tw, **kw) == 0
    assert budget_at(tw + 1, **kw) == kw["b0"]
    assert budget_at(T - tf + 1, **kw) == 0
    assert budget_at(T, **kw) == 0
    assert budget_at(T + 50, **kw) == 0


def test_last_window_step_is_inside_window() -> None:
    # paper: b(T - t_final) = b0 · (t_warmup / (T - t_final))³ = 4 · 0.125 = 0.5 -> round half up -> 1.
    # (Python's banker's round(0.5) would give 0; the docstring promises round-half-up.)
    kw = dict(b0=4, t_warmup=500, t_final=500, total_steps=1500)
    assert budget_at(1000, **kw, schedule="paper") == 1
    assert budget_at(1001, **kw, schedule="paper") == 0
    assert budget_at(1000, **kw, schedule="constant") == 4
    assert budget_at(1001, **kw, schedule="constant") == 0
    assert budget_at(1000, **kw, schedule="window") == 0  # the window curve reaches 0 at T - t_final
    assert is_event_step(1000, **kw, delta_t=100, schedule="paper")
    assert 1000 in event_steps(**kw, delta_t=100, schedule="paper")


def test_paper_vs_window_vs_constant_curves() -> None:
    kw = dict(b0=8, t_warmup=100, t_final=100, total_steps=1100)  # window (100, 1000], T - t_final = 1000
    # halfway through the window: paper 8·(1 - 450/1000)³ = 1.331 -> 1; window 8·(1 - 450/900)³ = 1.0 -> 1
    # a quarter through: paper 8·(1 - 225/1000)³ = 3.72 -> 4; window 8·(1 - 225/900)³ = 3.375 -> 3
    assert budget_at(325, **kw, schedule="paper") == 4
    assert budget_at(325, **kw, schedule="window") == 3
    assert budget_at(325, **kw, schedule="constant") == 8
    assert budget_at(550, **kw, schedule="paper") == 1
    assert budget_at(550, **kw, schedule="window") == 1
    # near the end: paper 8·(1 - 890/1000)³ = 0.0106 -> 0; constant still b0
    assert budget_at(990, **kw, schedule="paper") == 0
    assert budget_at(990, **kw, schedule="constant") == 8
    # the window curve is never above the paper curve inside the window (its denominator is smaller)
    for step in range(101, 1001):
        assert budget_at(step, **kw, schedule="window") <= budget_at(step, **kw, schedule="paper") <= 8


def test_zero_b0_and_unknown_schedule() -> None:
    assert budget_at(600, b0=0, t_warmup=500, t_final=500, total_steps=3000) == 0
    assert event_steps(b0=0, t_warmup=5, t_final=5, total_steps=50, delta_t=1) == []
    with pytest.raises(ValueError, match="cosine"):
        budget_at(600, **TYPICAL, schedule="cosine")


def test_event_steps_typical() -> None:
    steps = event_steps(**TYPICAL, delta_t=100)
    assert steps[0] == 600  # the first Δ_T multiple strictly after t_warmup
    assert all(s % 100 == 0 for s in steps)
    assert steps == sorted(steps) and max(steps) <= 2500
    # t_warmup itself on the grid is excluded; the first event is the next multiple
    assert 500 not in event_steps(**TYPICAL, delta_t=50)
    assert event_steps(**TYPICAL, delta_t=50)[0] == 550


# ------------------------------------------------------------------------------------------------ properties
@SETTINGS
@given(s=schedules())
def test_clamped_to_zero_b0(s: dict) -> None:
    for step in range(0, s["total_steps"] + 2):
        assert 0 <= budget_at(step, **_budget_kwargs(s)) <= s["b0"]


@SETTINGS
@given(s=schedules())
def test_monotone_non_increasing_inside_window(s: dict) -> None:
    kw = _budget_kwargs(s)
    inside = range(s["t_warmup"] + 1, s["total_steps"] - s["t_final"] + 1)
    values = [budget_at(step, **kw) for step in inside]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    # and zero outside the window
    assert budget_at(s["t_warmup"], **kw) == 0
    assert budget_at(s["total_steps"] - s["t_final"] + 1, **kw) == 0


@SETTINGS
@given(s=schedules())
def test_event_steps_on_grid_and_equal_brute_force(s: dict) -> None:
    steps = event_steps(**s)
    assert all(step % s["delta_t"] == 0 for step in steps)
    assert all(s["t_warmup"] < step <= s["total_steps"] - s["t_final"] for step in steps)
    brute = [step for step in range(1, s["total_steps"] + 1) if is_event_step(step, **s)]
    assert steps == brute
    assert steps == ref_event_steps(**s)


@SETTINGS
@given(s=schedules())
def test_budget_matches_reference(s: dict) -> None:
    kw = _budget_kwargs(s)
    for step in range(0, s["total_steps"] + 2):
        assert budget_at(step, **kw) == ref_budget(step, **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(delta_t=100.0), r"event_steps: delta_t=100\.0 must be an integer.*Write delta_t=100"),
        (dict(t_warmup=True), r"event_steps: t_warmup=True must be an integer \(got bool\)"),
        (dict(total_steps="3000"), r"event_steps: total_steps='3000' must be an integer"),
        (dict(delta_t=0), r"event_steps: delta_t=0 must be >= 1"),
    ],
)
def test_non_integer_schedule_arguments_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        event_steps(**{**TYPICAL, "delta_t": 100, **kwargs})


def test_budget_at_and_is_event_step_check_their_arguments() -> None:
    with pytest.raises(ValueError, match=r"budget_at: step=600\.0 must be an integer"):
        budget_at(600.0, **TYPICAL)
    with pytest.raises(ValueError, match=r"is_event_step: delta_t=50\.0 must be an integer"):
        is_event_step(600, **TYPICAL, delta_t=50.0)
