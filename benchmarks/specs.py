"""Method specs of the benchmarks, and how a spec or flag naming a removed `FlexLoRAConfig` field is read.

A method spec names one run's method and its overrides: ``flexlora:importance=nuclear,lr=0.001`` is FlexLoRA with
``importance="nuclear"`` at learning rate 1e-3 (`parse_method`); the decoder check names its FlexLoRA variants by
finetune.py flags instead. Specs and flags are the keys of the result records under ``benchmarks/results/``, so a
record written before `FlexLoRAConfig` folded its switches may name one of them (`flexlora_hf.config.REMOVED_FIELDS`,
e.g. ``lam_lr_ratio=1``). Such a name at the value the library kept names nothing any more: `drop_removed` drops it,
so the record still matches the run the same spec makes today. At any other value the run cannot be made any more
(its record is history) and asking for it raises a `ValueError` naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

from flexlora_hf.config import REMOVED_FIELDS, FlexLoRAConfig

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _coerce(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``flexlora:importance=nuclear,lr=0.01`` -> ("flexlora", {"importance": "nuclear", "lr": 0.01})."""
    name, _, rest = method.partition(":")
    overrides = {k: _coerce(v) for k, v in (item.split("=", 1) for item in rest.split(",") if item)}
    return name, overrides


def is_kept(name: str, value: Any) -> bool:
    """Whether `value` (typed, or a string from a spec or a command line) of the removed field `name` is the
    behaviour the library kept (`REMOVED_FIELDS`), e.g. ``("lam_lr_ratio", "1")`` or ``("adam_reset", "slot_age")``."""
    kept = REMOVED_FIELDS[name]
    if isinstance(kept, bool):
        if isinstance(value, str):
            low = value.strip().lower()
            return (low in _TRUE) == kept if low in _TRUE + _FALSE else False
        return isinstance(value, (bool, int)) and bool(value) == kept
    if isinstance(kept, (int, float)):
        try:
            return float(value) == float(kept)
        except (TypeError, ValueError):
            return False
    return str(value) == kept


def drop_removed(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`values` without the removed fields, each of which must hold the behaviour kept (else `ValueError`)."""
    for name, value in values.items():
        if name in REMOVED_FIELDS and not is_kept(name, value):
            raise ValueError(
                f"{where}: {name}={value!r} cannot run any more: FlexLoRAConfig no longer has {name!r} (its behaviour "
                f"is fixed at {name}={REMOVED_FIELDS[name]!r}, flexlora_hf.config.REMOVED_FIELDS). Drop it for that "
                "behaviour; the records that name it are history."
            )
    return {k: v for k, v in values.items() if k not in REMOVED_FIELDS}


def config_defaults() -> dict[str, Any]:
    """`FlexLoRAConfig`'s field defaults."""
    return {f.name: f.default for f in dataclasses.fields(FlexLoRAConfig) if f.default is not dataclasses.MISSING}


def is_library_default(method: str) -> bool:
    """Whether a FlexLoRA spec (its ``lr`` aside) is the library defaults: ``flexlora:lr=0.001`` and the controls'
    ``flexlora:init_basis=lora_like,lam_lr_ratio=1,lr=0.001`` are; one naming a removed field off its kept value is
    not."""
    name, overrides = parse_method(method)
    overrides.pop("lr", None)
    if name != "flexlora":
        return False
    try:
        fields = drop_removed(overrides, method)
    except ValueError:
        return False
    defaults = config_defaults()
    return all(k in defaults and defaults[k] == v for k, v in fields.items())
