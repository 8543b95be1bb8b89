"""The reallocation budget b(t) of eq. 4 and the event grid (pure functions of integers).

Step numbering: ``t`` is the **1-based optimizer step that has just completed** (the Trainer's
``state.global_step`` in ``on_step_end``), never a micro-batch index, so gradient accumulation does not change the
schedule.

Window and grid: an event may happen after step ``t`` when ``t_warmup < t <= total_steps - t_final`` and
``t % delta_t == 0`` (the global Δ_T grid that AdaLoRA and the reference code use) and ``b(t) > 0``.

Curves (``schedule``):

* ``"paper"``: eq. 4 as printed, ``round(b0 · (1 - (t - t_warmup) / (T - t_final))³)`` clamped to [0, b0]. Note
  the denominator is ``T - t_final`` (not the window length), so the curve does not reach 0 at the window's end;
  outside the window b(t) is 0. The reference code's ``b0·(1 - p³)`` is neither this nor AdaLoRA's curve; we do not
  reproduce it.
* ``"window"``: the cubic normalised over the window, ``round(b0 · (1 - (t - t_warmup) / (T - t_final - t_warmup))³)``
  (AdaLoRA's shape, reaching 0 at ``T - t_final``).
* ``"constant"``: b0 throughout the window.

Python's ``round`` is banker's rounding; we use round-half-up (``floor(x + 0.5)``) so b(t) is monotone in t.

Every argument is checked to be an integer (not a bool, not a float such as ``100.0`` from a hand-edited JSON
file, which would break ``range`` or silently shift the grid); a wrong one raises `ValueError` naming it.
"""

from __future__ import annotations

import math
from typing import Any

from ..choices import SCHEDULES, is_integer


def _check_ints(caller: str, **values: Any) -> None:
    for name, value in values.items():
        if not is_integer(value):
            hint = f" Write {name}={int(value)}." if isinstance(value, float) and value.is_integer() else ""
            raise ValueError(f"{caller}: {name}={value!r} must be an integer (got {type(value).__name__}).{hint}")
    if "delta_t" in values and values["delta_t"] < 1:
        raise ValueError(f"{caller}: delta_t={values['delta_t']!r} must be >= 1.")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def budget_at(
    step: int, *, b0: int, t_warmup: int, t_final: int, total_steps: int, schedule: str = "paper"
) -> int:
    """Number of directions to prune and to expand after optimizer step `step` (eq. 4, clamped to [0, b0]).

    Args:
        step (`int`): the 1-based optimizer step that has just completed.
        b0 (`int`): the paper's b.
        t_warmup (`int`), t_final (`int`): T_warmup and T_final.
        total_steps (`int`): T, the total number of optimizer steps.
        schedule (`str`): `"paper"` (eq. 4), `"window"` or `"constant"`; see the module docstring.

    Returns:
        `int` in [0, b0]; 0 outside `(t_warmup, total_steps - t_final]`. The Δ_T grid is applied by `is_event_step`.
    """
    _check_ints("budget_at", step=step, b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    end = total_steps - t_final
    if b0 <= 0 or step <= t_warmup or step > end:
        return 0
    if schedule == "constant":
        return b0
    denom = end if schedule == "paper" else end - t_warmup
    frac = (step - t_warmup) / denom
    value = _round_half_up(b0 * (1.0 - frac) ** 3)
    return max(0, min(b0, value))


def is_event_step(
    step: int, *, b0: int, t_warmup: int, t_final: int, total_steps: int, delta_t: int, schedule: str = "paper"
) -> bool:
    """True when a reallocation event happens after optimizer step `step` (window, Δ_T grid and b(t) > 0)."""
    _check_ints("is_event_step", step=step, delta_t=delta_t)
    if step % delta_t != 0:
        return False
    return budget_at(step, b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps, schedule=schedule) > 0


def event_steps(
    *, b0: int, t_warmup: int, t_final: int, total_steps: int, delta_t: int, schedule: str = "paper"
) -> list[int]:
    """All optimizer steps after which an event happens, in order."""
    _check_ints("event_steps", b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps, delta_t=delta_t)
    first = (t_warmup // delta_t + 1) * delta_t
    return [
        t
        for t in range(first, total_steps - t_final + 1, delta_t)
        if budget_at(t, b0=b0, t_warmup=t_warmup, t_final=t_final, total_steps=total_steps, schedule=schedule) > 0
    ]
