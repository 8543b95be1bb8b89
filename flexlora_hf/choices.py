"""The allowed values of `FlexLoRAConfig` fields and the checks and parsers of single values (pure, stdlib only).

Split from `config.py` so the pure math modules (`schedule`, `allocation`, `io.validation`) can use the same checks
without importing the config class. Schedule lengths (`t_warmup`, `t_final`, `delta_t`) are steps or fractions of
the run, resolved here by `steps_of`, the only place that does it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

IMPORTANCE_METRICS = ("entropy", "nuclear", "frobenius", "elem_energy_entropy", "mat_energy_entropy")
CONTROL_METRICS = ("random",)  # not a metric: the control that says what chance gives (scoring.random_scores)
ALLOCATIONS = ("bidirectional", "prune_only", "expand_only")
EXPANSION_INITS = ("zero_impact", "small", "zero", "orthogonal")
SCHEDULES = ("paper", "window", "constant")
INIT_BASES = ("orthonormal", "gaussian", "lora_like")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"FlexLoRAConfig.{name}={value!r} is not supported; choose one of {', '.join(choices)}.")


def is_integer(value: Any) -> bool:
    """An integer that is not a bool (Python or NumPy ints; `True` and `100.0` are not integers here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_integer(name: str, value: Any, minimum: int | None, fix: str) -> None:
    if not is_integer(value) or (minimum is not None and value < minimum):
        # A float such as 100.0 (a hand-edited JSON file) would break the event grid's range() and slot arithmetic.
        hint = f" Write {name}={int(value)}." if isinstance(value, float) and value.is_integer() else ""
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"FlexLoRAConfig.{name}={value!r} must be an integer{bound} ({fix}).{hint}")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"FlexLoRAConfig.{name}={value!r} must be a finite number (got {type(value).__name__}).")


REGEX_PREFIX = "re:"
"""Prefix marking a command-line ``--target_modules`` value as a regular expression instead of a list of names."""


def parse_module_list(value: Any) -> list[str] | str | None:
    """The one parser of ``target_modules`` / ``modules_to_save`` values, from Python, JSON or the command line.

    Args:
        value (`str`, `list[str]` or `None`):
            a list (Python, JSON, or ``nargs`` flags such as ``['q_proj,v_proj']``) is split on commas, and
            ``['all-linear']`` becomes ``"all-linear"``; a command-line string ``"query,key,value"`` becomes
            ``["query", "key", "value"]``, ``"all-linear"`` stays, ``"re:.*attn.*"`` is the regex ``".*attn.*"``,
            ``"none"`` is ``[]``; `None` or ``""`` is `None` (the library default).

    Returns:
        `list[str]`, `str` or `None`: a value `FlexLoRAConfig` accepts.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        if not all(isinstance(item, str) for item in value):
            raise ValueError(
                f"module list {list(value)!r} must hold module names (strings), e.g. ['q_proj', 'v_proj']."
            )
        items = sorted(value) if isinstance(value, (set, frozenset)) else value  # sets have no order: sort them
        names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names
    if not isinstance(value, str):
        raise ValueError(
            f"module list {value!r} must be a string or a list of module names, e.g. ['q_proj', 'v_proj']."
        )
    text = value.strip()
    if not text:
        return None
    if text.lower() == "none":
        return []
    if text == "all-linear":
        return text
    if text.startswith(REGEX_PREFIX):
        return text[len(REGEX_PREFIX) :]
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_max_rank(value: Any) -> int | dict[str, int] | None:
    """Parse a ``max_rank`` value: ``"12"`` -> 12, ``'{"layer.0.query": 16}'`` -> a dict, `None`/``""`` -> `None`.

    Raises:
        ValueError: if the string is neither an integer nor a JSON object, or a cap is not an integer.
    """
    if value is None or is_integer(value):
        return value
    if isinstance(value, Mapping):
        bad = {k: v for k, v in value.items() if not is_integer(v)}
        if bad:
            raise ValueError(
                f"--max_rank caps must be integers; got {bad!r}. "
                f"Write e.g. {{\"model.layers.0.self_attn.q_proj\": 16}}."
            )
        return {str(k): int(v) for k, v in value.items()}
    if not isinstance(value, str):
        raise ValueError(f"--max_rank={value!r} must be an integer or a JSON object {{module path: cap}}.")
    text = value.strip()
    if not text:
        return None
    if text.startswith("{"):
        return parse_max_rank(json.loads(text))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--max_rank={value!r} must be an integer or a JSON object {{module path: cap}}.") from None


def check_steps(name: str, value: Any, minimum: int) -> int | float:
    """A schedule length: an integer number of optimizer steps (>= `minimum`), or a fraction of the run in (0, 1)
    as `warmup_ratio` is. Integral floats (`100.0`, which `--delta_t 100` parses to) become ints.

    Raises:
        ValueError: naming the field, the value and the fix.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(
            f"FlexLoRAConfig.{name}={value!r} must be a number of steps or a fraction of the run in (0, 1)."
        )
    number = float(value)
    if 0 < number < 1:
        return number
    if number.is_integer() and number >= minimum:
        return int(number)
    raise ValueError(
        f"FlexLoRAConfig.{name}={value!r} must be an integer number of optimizer steps >= {minimum}, or a fraction of "
        f"the run in (0, 1) (e.g. {name}=0.1 for 10% of the steps)."
    )


def steps_of(value: int | float, total_steps: int, minimum: int = 0) -> int:
    """Optimizer steps for a schedule length: `value` itself, or round(value * total_steps) for a fraction."""
    if isinstance(value, float) and 0 < value < 1:
        return max(minimum, int(math.floor(value * total_steps + 0.5)))
    return int(value)
