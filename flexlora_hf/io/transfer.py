"""Rank-map transfer: train once with FlexLoRA, then reuse its rank allocation in a plain PEFT LoRA.

FlexLoRA's product is not only an adapter but an allocation: how many directions each weight matrix needed. This
module turns that allocation into a stock `peft.LoraConfig` (per-module `rank_pattern` and `alpha_pattern`), so
the next run (a new seed, a larger dataset, another framework that reads PEFT configs) trains an ordinary LoRA
with FlexLoRA's ranks and none of its overhead (no spare slots, no orthogonality term, no events).

* [`to_lora_config`] reads the allocation of a live `FlexLoRAModel` (also `FlexLoRAModel.to_lora_config`);
* [`lora_config_from_pretrained`] reads it from a saved adapter folder or a Hub repo (only `flexlora_config.json`,
  `rank_map.json` and `adapter_config.json` are fetched; no weights);
* [`lora_config_from_rank_map`] builds the config from a plain `{module path: rank}` mapping;
* `warm_start.load_peft_view` loads the PEFT view that `save_pretrained` writes into a LoRA built from such a
  config, rescaling `lora_B` to that LoRA's per-module scale, so it reproduces the FlexLoRA model's outputs.

Alpha policies (PEFT scales a LoRA module by `alpha_m / r_m`; FlexLoRA scales every direction by
`lora_alpha / r`, with `r` the initial rank, whatever a module's current rank):

* ``"constant_scale"`` (default): `alpha_m = (lora_alpha / r) * r_m`, so every module keeps FlexLoRA's scale
  `lora_alpha / r`. This is the parametrisation under which the allocation was learned (FlexLoRA's rank moves are
  output-neutral precisely because the scale does not depend on the rank), it is the scale a uniform LoRA at
  `r` with `lora_alpha` has in every module, and so a learning rate tuned for either carries over unchanged. A
  comparison "uniform LoRA vs transferred ranks" then differs in the ranks only.
* ``"constant_alpha"``: `alpha_m = lora_alpha` for every module, so a module's scale is `lora_alpha / r_m`: what
  PEFT does when only `rank_pattern` is set. Modules that gained rank get a smaller per-direction scale and
  modules that lost rank a larger one; use it to match a codebase that keeps `lora_alpha` fixed.

Modules at rank 0 cannot be a PEFT LoRA target (PEFT refuses r = 0): they are left out, with a log line. The rank
map's module paths are those of the base model FlexLoRA was trained on, so the config applies to that architecture
(any checkpoint of it), not to a model with other module names or depth.

peft and huggingface_hub are imported inside the functions that use them.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..adapter.targets import matches
from ..constants import FLEXLORA_CONFIG_NAME, PEFT_CONFIG_NAME, RANK_MAP_NAME
from .peft_view import base_model_name_or_path, infer_task_type, pattern_order
from .validation import read_json

if TYPE_CHECKING:
    from peft import LoraConfig

    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)

ALPHA_POLICIES = ("constant_scale", "constant_alpha")
# LoraConfig fields this module derives from the rank map; setting them by hand would silently undo the transfer.
_DERIVED_FIELDS = ("r", "target_modules", "rank_pattern", "alpha_pattern")


def module_alpha(rank: int, *, r: int, lora_alpha: float, alpha_policy: str) -> float:
    """`lora_alpha` of a PEFT LoRA module of rank `rank` under `alpha_policy` (see the module docstring).

    Args:
        rank (`int`): the module's rank.
        r (`int`): FlexLoRA's initial rank (the denominator of its fixed scale `lora_alpha / r`).
        lora_alpha (`float`): FlexLoRA's (or your chosen) `lora_alpha`.
        alpha_policy (`str`): `"constant_scale"` or `"constant_alpha"`.
    """
    _check_policy(alpha_policy)
    if alpha_policy == "constant_alpha":
        return float(lora_alpha)
    alpha = float(lora_alpha) * int(rank) / int(r)
    # Whole numbers stay whole (16.0 -> 16) so the saved adapter_config.json reads like a hand-written one.
    return float(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=0, abs_tol=1e-9) else alpha


def lora_config_from_rank_map(
    rank_map: Mapping[str, int],
    *,
    r: int,
    lora_alpha: float,
    alpha_policy: str = "constant_scale",
    modules_to_save: Sequence[str] | None = None,
    lora_dropout: float = 0.0,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` whose per-module ranks are `rank_map` and whose scales follow `alpha_policy`.

    Args:
        rank_map (`Mapping[str, int]`): module path in the base model -> rank (`FlexLoRAModel.rank_map()`, or the
            saved `rank_map.json`).
        r (`int`): FlexLoRA's initial rank `r`; with `"constant_scale"` every module keeps the scale
            `lora_alpha / r`.
        lora_alpha (`float`): FlexLoRA's `lora_alpha` (or the value you want the policy applied to).
        alpha_policy (`str`, *optional*, defaults to `"constant_scale"`): `"constant_scale"` (alpha_m =
            lora_alpha / r * rank_m: FlexLoRA's scale everywhere) or `"constant_alpha"` (alpha_m = lora_alpha);
            see the module docstring for why `"constant_scale"` is the default.
        modules_to_save (`list[str]`, *optional*): modules trained in full (e.g. a classifier head). Adapted
            modules inside one are left out (PEFT never puts LoRA layers inside a `modules_to_save` copy).
        lora_dropout (`float`, *optional*, defaults to 0.0): dropout of the LoRA layers.
        task_type (`str`, *optional*): PEFT task type (`"SEQ_CLS"`, `"CAUSAL_LM"`, ...).
        fan_in_fan_out (`bool`, *optional*, defaults to `False`): `True` for GPT-2's `Conv1D` layers.
        base_model_name_or_path (`str`, *optional*): recorded in the config.
        lora_kwargs: any other `LoraConfig` field (`bias`, `init_lora_weights`, `layers_to_transform` is not
            useful here, ...). `r`, `target_modules`, `rank_pattern` and `alpha_pattern` come from the rank map,
            and `use_rslora=True` would change the scale rule, so these are refused.

    Returns:
        `peft.LoraConfig`: `target_modules` is the exact list of module paths with rank > 0 (model order),
        `rank_pattern` / `alpha_pattern` give each one its rank and alpha, and `r` / `lora_alpha` are the most
        common rank and its alpha.

    Raises:
        ValueError: unknown `alpha_policy`, a non-positive `r` or `lora_alpha`, a negative or non-integer rank, a
            derived field in `lora_kwargs`, or no module left with rank > 0.
    """
    from peft import LoraConfig

    _check_policy(alpha_policy)
    clashing = [k for k in _DERIVED_FIELDS if k in lora_kwargs]
    if clashing:
        raise ValueError(
            f"lora_config_from_rank_map: {clashing} are derived from the rank map; drop them (edit the rank map "
            "instead to change a module's rank)."
        )
    if lora_kwargs.get("use_rslora"):
        raise ValueError(
            "lora_config_from_rank_map: use_rslora=True scales by alpha / sqrt(r), which the alpha policies do not "
            "describe; drop it (the policies already fix each module's scale)."
        )
    if int(r) <= 0 or float(lora_alpha) <= 0:
        raise ValueError(
            f"lora_config_from_rank_map: r and lora_alpha must be positive, got r={r}, lora_alpha={lora_alpha}."
        )
    ranks: dict[str, int] = {}
    zero: list[str] = []
    inside_saved: list[str] = []
    saved = [str(m) for m in modules_to_save or []]
    for name, value in rank_map.items():
        if isinstance(value, bool) or (
            not isinstance(value, int) and not (isinstance(value, float) and value.is_integer())
        ):
            raise ValueError(f"lora_config_from_rank_map: rank of {name!r} must be an integer, got {value!r}.")
        rank = int(value)
        if rank < 0:
            raise ValueError(f"lora_config_from_rank_map: rank of {name!r} is negative ({rank}).")
        parts = name.split(".")
        if saved and any(matches(".".join(parts[:k]), saved) for k in range(1, len(parts) + 1)):
            inside_saved.append(name)
        elif rank == 0:
            zero.append(name)
        else:
            ranks[name] = rank
    if zero:
        logger.info(
            "Rank transfer: %d module(s) at rank 0 left out of the LoRA config (PEFT cannot build a rank-0 LoRA "
            "layer; they stay frozen): %s",
            len(zero),
            ", ".join(zero),
        )
    if inside_saved:
        logger.info(
            "Rank transfer: %d adapted module(s) inside modules_to_save %s left out (trained in full there): %s",
            len(inside_saved),
            saved,
            ", ".join(inside_saved),
        )
    if not ranks:
        raise ValueError(
            "lora_config_from_rank_map: no module has rank > 0, so there is nothing for a LoRA to adapt "
            f"({len(rank_map)} module(s) in the rank map)."
        )
    counts = Counter(ranks.values())
    common = max(counts, key=lambda k: (counts[k], k))
    alphas = {n: module_alpha(rank, r=r, lora_alpha=lora_alpha, alpha_policy=alpha_policy) for n, rank in ranks.items()}
    ordered = pattern_order(ranks)
    kwargs: dict[str, Any] = {
        "lora_dropout": float(lora_dropout),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "modules_to_save": list(saved) or None,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
    }
    kwargs.update(lora_kwargs)
    config = LoraConfig(
        r=common,
        lora_alpha=module_alpha(common, r=r, lora_alpha=lora_alpha, alpha_policy=alpha_policy),  # type: ignore[arg-type]
        target_modules=list(ranks),
        rank_pattern={n: ranks[n] for n in ordered},
        alpha_pattern={n: alphas[n] for n in ordered},
        **kwargs,
    )
    # LoraConfig turns target_modules into a set; keep the model order for readers of adapter_config.json.
    config.target_modules = list(ranks)
    logger.info(
        "Rank transfer: LoRA config for %d modules, total rank %d (ranks %d-%d), alpha policy %s.",
        len(ranks),
        sum(ranks.values()),
        min(ranks.values()),
        max(ranks.values()),
        alpha_policy,
    )
    return config


def to_lora_config(
    model: FlexLoRAModel,
    *,
    alpha_policy: str = "constant_scale",
    lora_alpha: float | None = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """The `peft.LoraConfig` that reproduces `model`'s current rank allocation (see the module docstring).

    Args:
        model (`FlexLoRAModel`): a trained (or loaded) FlexLoRA model.
        alpha_policy (`str`, *optional*, defaults to `"constant_scale"`): `"constant_scale"` keeps FlexLoRA's
            scale `lora_alpha / r` in every module (alpha_m = scale * rank_m); `"constant_alpha"` gives every
            module `lora_alpha`.
        lora_alpha (`float`, *optional*): the alpha the policy starts from; FlexLoRA's `lora_alpha` by default.
        lora_kwargs: other `LoraConfig` fields (e.g. `lora_dropout`, `init_lora_weights`); `lora_dropout`,
            `modules_to_save`, `task_type` and `fan_in_fan_out` default to the FlexLoRA model's.

    Returns:
        `peft.LoraConfig` for `get_peft_model(fresh_base_model, config)`.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> lora_config = flexlora_model.to_lora_config()         # FlexLoRA's ranks, FlexLoRA's scale
    >>> lora_model = get_peft_model(fresh_base_model, lora_config)   # a plain LoRA: train it with any Trainer
    ```
    """
    cfg = model.flexlora_config
    base = model.get_base_model()
    rank_map = model.rank_map()
    defaults: dict[str, Any] = {
        "lora_dropout": float(cfg.lora_dropout),
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "task_type": infer_task_type(base),
        "fan_in_fan_out": any(layer.fan_in_fan_out for name, layer in model.flexlora_layers() if rank_map[name]),
        "base_model_name_or_path": base_model_name_or_path(base),
    }
    defaults.update(lora_kwargs)
    return lora_config_from_rank_map(
        rank_map,
        r=cfg.r,
        lora_alpha=float(cfg.lora_alpha if lora_alpha is None else lora_alpha),
        alpha_policy=alpha_policy,
        **defaults,
    )


def lora_config_from_pretrained(
    path_or_repo_id: str | os.PathLike[str],
    *,
    alpha_policy: str = "constant_scale",
    lora_alpha: float | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **lora_kwargs: Any,
) -> LoraConfig:
    """[`to_lora_config`] for a saved adapter: a folder written by `save_pretrained`, or a Hub repo id.

    Reads `flexlora_config.json` (r, lora_alpha, lora_dropout, modules_to_save), `rank_map.json` and, when
    present, the PEFT view's `adapter_config.json` (task type, `fan_in_fan_out`, base model name). No weights are
    read or downloaded.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): adapter folder or Hub repo id.
        alpha_policy (`str`, *optional*, defaults to `"constant_scale"`): see [`to_lora_config`].
        lora_alpha (`float`, *optional*): the alpha the policy starts from; the saved `lora_alpha` by default.
        revision (`str`, *optional*): branch, tag or commit of the Hub repo.
        token (`str` or `bool`, *optional*): Hub token for private repos.
        lora_kwargs: other `LoraConfig` fields, as in [`to_lora_config`].

    Raises:
        FileNotFoundError: `flexlora_config.json` or `rank_map.json` is missing.
        ValueError: a file is not valid JSON or lacks `r` / `lora_alpha`, or a rank is not a non-negative integer.
    """
    from .hub import resolve_directory

    directory = resolve_directory(
        os.fspath(path_or_repo_id),
        revision=revision,
        token=token,
        allow_patterns=(FLEXLORA_CONFIG_NAME, RANK_MAP_NAME, PEFT_CONFIG_NAME),
    )
    raw = read_json(directory, FLEXLORA_CONFIG_NAME, who="lora_config_from_pretrained")
    rank_map = read_json(directory, RANK_MAP_NAME, who="lora_config_from_pretrained")
    if not isinstance(raw, dict) or "r" not in raw or "lora_alpha" not in raw:
        raise ValueError(
            f"lora_config_from_pretrained: {os.path.join(directory, FLEXLORA_CONFIG_NAME)} has no 'r' / 'lora_alpha'; "
            "it is not a FlexLoRA config (save the adapter again with save_pretrained)."
        )
    if not isinstance(rank_map, dict):
        raise ValueError(
            f"lora_config_from_pretrained: {os.path.join(directory, RANK_MAP_NAME)} must hold a JSON object "
            "{module path: rank}."
        )
    view = read_json(directory, PEFT_CONFIG_NAME, required=False, who="lora_config_from_pretrained") or {}
    saved_modules = raw.get("modules_to_save")
    defaults: dict[str, Any] = {
        "lora_dropout": float(raw.get("lora_dropout") or 0.0),
        "modules_to_save": [saved_modules] if isinstance(saved_modules, str) else saved_modules or None,
        "task_type": view.get("task_type"),
        "fan_in_fan_out": bool(view.get("fan_in_fan_out", False)),
        "base_model_name_or_path": view.get("base_model_name_or_path") or raw.get("_base_model_name_or_path"),
    }
    defaults.update(lora_kwargs)
    return lora_config_from_rank_map(
        rank_map,
        r=int(raw["r"]),
        lora_alpha=float(raw["lora_alpha"] if lora_alpha is None else lora_alpha),
        alpha_policy=alpha_policy,
        **defaults,
    )


def _check_policy(alpha_policy: str) -> None:
    if alpha_policy not in ALPHA_POLICIES:
        raise ValueError(
            f"alpha_policy={alpha_policy!r} is not one of {ALPHA_POLICIES}: 'constant_scale' keeps FlexLoRA's scale "
            "lora_alpha / r in every module, 'constant_alpha' gives every module lora_alpha."
        )
