"""Which modules get adapters: target matching, `modules_to_save` roots, classifier heads and slot capacities.

The one home of module-path matching (PEFT's rules: an exact path or a `.`-separated suffix, "all-linear", or a
regex matched in full), used by injection, saving and the PEFT view alike, and the check that a `max_rank` mapping
names adapted modules (a typo would otherwise silently fall back to the derived cap). Imports torch only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

from torch import nn

from ..config import FlexLoRAConfig
from ..functional.schedule import event_steps
from .layer import is_supported_layer

logger = logging.getLogger(__name__)

_HEAD_NAMES = ("classifier", "score", "lm_head")
_CLS_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification")


def _output_head_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def default_modules_to_save(model: nn.Module) -> list[str] | None:
    """Classification heads that PEFT's SEQ_CLS/TOKEN_CLS task types would train in full."""
    if not type(model).__name__.endswith(_CLS_SUFFIXES):
        return None
    found = [h for h in ("classifier", "score") if any(n == h or n.endswith("." + h) for n, _ in model.named_modules())]
    return found or None


def matches(name: str, patterns: Iterable[str] | None) -> bool:
    """PEFT's rule: `name` equals a pattern or ends with `.` + pattern."""
    return any(name == p or name.endswith("." + p) for p in patterns or [])


def find_target_modules(model: nn.Module, config: FlexLoRAConfig) -> list[str]:
    """Module paths to wrap, in model order. Raises `ValueError` listing the model's linear layers if none match."""
    linear_names = [n for n, m in model.named_modules() if n and is_supported_layer(m)]
    save = list(config.modules_to_save or [])
    # A module trained in full is not also adapted, nor are the linear layers inside it (RoBERTa's classifier.out_proj).
    excluded = {
        n for n in linear_names if any(matches(".".join(n.split(".")[:k]), save) for k in range(1, n.count(".") + 2))
    }
    target = config.target_modules if config.target_modules is not None else "all-linear"
    chosen: list[str]
    if target == "all-linear":
        heads = _output_head_names(model)
        chosen = [
            n
            for n in linear_names
            if n not in excluded and n not in heads and n.split(".")[-1] not in _HEAD_NAMES
        ]
    elif isinstance(target, str):
        pattern = re.compile(target)
        chosen = [n for n in linear_names if n not in excluded and pattern.fullmatch(n)]
    else:
        targets = list(target)
        chosen = [n for n in linear_names if n not in excluded and matches(n, targets)]
        suffixes = {n.split(".")[-1] for n in linear_names}
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
        if unknown:
            raise ValueError(
                f"target_modules {unknown} match no linear layer of {type(model).__name__}. "
                f"Its linear module names are: {', '.join(sorted(suffixes))}."
            )
    if not chosen:
        raise ValueError(
            f"target_modules={target!r} matches no linear layer of {type(model).__name__}. "
            f"Its linear module names are: {', '.join(sorted({n.split('.')[-1] for n in linear_names}))}."
        )
    check_max_rank_keys(config, chosen)
    return chosen


def check_max_rank_keys(config: FlexLoRAConfig, module_names: Iterable[str]) -> None:
    """Every key of a `max_rank` mapping must be the full path of an adapted module.

    A key that names no adapted module (a typo, a bare suffix such as `"q_proj"`, a module left out of
    `target_modules`) would leave that module on the derived cap without a word, so it raises instead.

    Raises:
        ValueError: listing the unknown keys and the adapted module paths.
    """
    if not isinstance(config.max_rank, Mapping):
        return
    names = list(module_names)
    unknown = sorted(set(config.max_rank) - set(names))
    if unknown:
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise ValueError(
            f"FlexLoRAConfig.max_rank names modules that are not adapted: {', '.join(map(repr, unknown))}. Keys "
            f"must be full module paths of adapted modules (exact match, no suffixes); the adapted modules are: "
            f"{shown}. Fix the keys or add those modules to target_modules."
        )


def resolve_capacity(config: FlexLoRAConfig, name: str, d_in: int, d_out: int) -> int:
    """Slots for one module: the user cap, else exactly r + number of scheduled events; bounded by min(d_in, d_out).

    Each event adds at most one direction to a module, so r + #events can never be exceeded. Without `total_steps`
    the capacity is provisional (r) and `FlexLoRAModel.finalize_capacity` grows it before the optimizer exists.
    """
    bound = min(d_in, d_out)
    cap = config.max_rank.get(name) if isinstance(config.max_rank, Mapping) else config.max_rank
    if cap is None:
        if config.allocation == "prune_only" or config.total_steps is None:
            cap = config.r
        else:
            n_events = len(event_steps(**config.grid_kwargs()))
            cap = config.r + n_events
    return max(config.r, min(int(cap), bound))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def modules_to_save_roots(base_model: nn.Module, patterns: Iterable[str] | None) -> list[str]:
    """Paths of the outermost modules of `base_model` matched by `patterns` (`modules_to_save`), in model order."""
    patterns = [str(p) for p in (patterns or [])]
    roots: list[str] = []
    if not patterns:
        return roots
    for name, _ in base_model.named_modules():
        if name and matches(name, patterns) and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
    if not roots:
        logger.warning("modules_to_save=%s matches no module of the base model; nothing extra is saved.", patterns)
    return roots
