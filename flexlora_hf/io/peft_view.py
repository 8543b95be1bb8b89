"""The plain PEFT LoRA view of a FlexLoRA adapter, and the model introspection PEFT's config needs.

PEFT view (stock `PeftModel.from_pretrained(base, folder)`, no flexlora_hf needed):

* `adapter_config.json`: a `LoraConfig` whose `target_modules` is the exact list of adapted module paths with rank
  > 0, with `rank_pattern` = `alpha_pattern` = that rank per module (so PEFT's scale alpha / r is exactly 1).
* `adapter_model.safetensors`: `base_model.model.<path>.lora_A.weight` = Q (r, in) and
  `base_model.model.<path>.lora_B.weight` = P·diag(λ)·scaling (out, r); modules_to_save weights under
  `base_model.model.<param path>` (the names `get_peft_model_state_dict` writes in PEFT 0.21).

`base_model_name_or_path` is the base config's `_name_or_path` (a Hub id, or the local folder it was loaded from,
see [`is_local_path`]) unless the caller names the Hub id (`save_flexlora(..., model_card_kwargs={"base_model":
...})`, `push_to_hub(..., base_model=...)`). [`pattern_order`] is the one rule for ordering exact-path pattern
keys, shared with the rank-map transfer (`flexlora_hf.io.transfer`).

peft is imported only inside [`peft_export`].
"""

from __future__ import annotations

import enum
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter.targets import modules_to_save_roots
from ..constants import PEFT_KEY_PREFIX
from .native import modules_to_save_state, peft_module_path

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)


def infer_task_type(base_model: nn.Module) -> str | None:
    """PEFT `task_type` for a transformers model class: `CAUSAL_LM`, `SEQ_CLS`, `TOKEN_CLS` or `None`."""
    name = type(base_model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def base_model_name_or_path(base_model: nn.Module) -> str | None:
    """`config._name_or_path` of the base model (None for a model built from a config)."""
    config = getattr(base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def is_local_path(name: str) -> bool:
    """Whether a base model name is a path on this machine (an existing folder, or plainly a path) and not a Hub id.

    A Hub id is `name` or `namespace/name`; anything absolute, starting with `.` or `~`, with more than one `/` or
    with a backslash can only be a path.
    """
    return (
        os.path.isdir(name)
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def _jsonable(value: Any) -> Any:
    """PEFT config values as plain JSON (sets -> sorted lists, str enums -> their value)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):  # PeftType / TaskType: str() would give "PeftType.LORA"
        return value.value
    return value


def pattern_order(names: Iterable[str]) -> list[str]:
    """Module paths in the order to list them as `rank_pattern` / `alpha_pattern` keys: deeper paths first.

    PEFT matches a pattern key K against a module path M with `re.match(rf"(.*\\.)?({K})$", M)` and takes the
    *first* matching key, so a path that is a `.`-suffix of another would capture it; a suffix always has fewer
    components. The sort is stable, so model order is kept among paths of equal depth.
    """
    return sorted(names, key=lambda n: -n.count("."))


def peft_export(model: FlexLoRAModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The plain PEFT LoRA view: (`adapter_config.json` dict, `adapter_model.safetensors` tensors).

    λ and FlexLoRA's scaling (lora_alpha / r_init) are folded into `lora_B`; every module gets `alpha = r` so
    PEFT's own scale is exactly 1. Modules at rank 0 are left out (PEFT cannot build a rank-0 LoRA layer).
    """
    from peft import LoraConfig

    cfg = model.flexlora_config
    base = model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = False
    roots = modules_to_save_roots(base, cfg.modules_to_save)
    saved_in_full = modules_to_save_state(model)
    for name, layer in model.flexlora_layers():
        compact = layer.compact()
        rank = int(compact["lam"].shape[0])
        if any(name == r or name.startswith(r + ".") for r in roots):
            # PEFT never puts LoRA layers inside a modules_to_save copy (it ignores such targets), so ΔW goes into
            # the full weight that PEFT saves for that module instead: exact, and loadable by stock PEFT.
            key = f"{name}.base_layer.weight"
            weight = saved_in_full.get(key)
            if weight is None or not weight.is_floating_point():  # e.g. a packed 4-bit weight: cannot add ΔW
                raise ValueError(
                    f"PEFT export: {name} is adapted inside modules_to_save {roots} and its weight cannot hold the "
                    "merged update; exclude it from target_modules."
                )
            delta = layer.delta_weight().T if layer.fan_in_fan_out else layer.delta_weight()
            saved_in_full[key] = (weight.float() + delta.cpu()).to(weight.dtype)
            logger.info("PEFT view: %s lies inside modules_to_save; its update is merged into the saved weight.", name)
            continue
        if rank == 0:
            continue
        ranks[name] = rank
        conv1d = conv1d or layer.fan_in_fan_out
        P = compact["P"].float()  # (out, r)
        lam = compact["lam"].float()  # (r,)
        dtype = layer.lora_P.dtype
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = compact["Q"].to("cpu").contiguous()  # (r, in)
        lora_B = (P * lam * layer.scaling).to(dtype)  # (out, r)
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = lora_B.to("cpu").contiguous()
    for key, tensor in saved_in_full.items():
        tensors[PEFT_KEY_PREFIX + peft_module_path(key)] = tensor

    if not ranks:
        logger.warning("Every adapted module is at rank 0: the PEFT view has no LoRA layer and PEFT cannot load it.")
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else cfg.r
    ordered = pattern_order(ranks)
    modules_to_save = list(cfg.modules_to_save) if cfg.modules_to_save else None
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(ranks),
        rank_pattern={n: ranks[n] for n in ordered},
        alpha_pattern={n: ranks[n] for n in ordered},
        lora_dropout=float(cfg.lora_dropout),
        fan_in_fan_out=conv1d,
        bias="none",
        modules_to_save=modules_to_save,
        task_type=infer_task_type(base),
        base_model_name_or_path=base_model_name_or_path(base),
        inference_mode=True,
    )
    config = _jsonable(lora_config.to_dict())  # to_dict drops the runtime-only fields
    config["target_modules"] = list(ranks)  # exact paths in model order (LoraConfig keeps a set)
    return config, tensors


