"""Warm start of a transferred LoRA: load a FlexLoRA adapter's PEFT view into a LoRA built from its rank map.

The PEFT view stores `lora_B = P·diag(λ)·scaling` at PEFT scale 1; a LoRA built by `transfer.to_lora_config` has
another per-module scale, so [`load_peft_view`] rescales `lora_B` on the way in. The result computes exactly the
FlexLoRA model's function (a warm start, or a check that the transfer is exact). peft is imported where used.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

from ..constants import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from .validation import read_json

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)


def load_peft_view(
    peft_model: PeftModel,
    path_or_repo_id: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    revision: str | None = None,
    token: str | bool | None = None,
) -> PeftModel:
    """Load the PEFT view of a FlexLoRA adapter into a LoRA built from [`to_lora_config`], in place.

    The PEFT view stores `lora_B = P·diag(λ)·scaling` with PEFT scale 1 (alpha = rank); a LoRA built with an alpha
    policy has another per-module scale `s_m`, so `lora_B` is divided by `s_m` on the way in. The result computes
    exactly the FlexLoRA model's function, and training can continue from it as a plain LoRA.

    Args:
        peft_model (`peft.PeftModel`): `get_peft_model(fresh_base_model, lora_config)`.
        path_or_repo_id (`str` or `os.PathLike`): adapter folder or Hub repo id holding `adapter_config.json` and
            `adapter_model.safetensors`.
        adapter_name (`str`, *optional*, defaults to `"default"`): the LoRA adapter to fill.
        revision (`str`, *optional*): branch, tag or commit of the Hub repo.
        token (`str` or `bool`, *optional*): Hub token for private repos.

    Returns:
        `peft.PeftModel`: `peft_model`, with the weights loaded.

    Raises:
        FileNotFoundError: a PEFT view file is missing.
        ValueError: the LoRA and the view adapt different modules or ranks (the message names the module), or the
            view holds tensors the model has no place for.
    """
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from ..constants import PEFT_KEY_PREFIX
    from .hub import resolve_directory

    directory = resolve_directory(
        os.fspath(path_or_repo_id),
        revision=revision,
        token=token,
        allow_patterns=(PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME),
    )
    view = read_json(directory, PEFT_CONFIG_NAME, who="load_peft_view")
    weights_path = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"load_peft_view: {PEFT_WEIGHTS_NAME} is missing from {directory}.")
    tensors = load_file(weights_path)
    view_ranks: dict[str, int] = dict(view.get("rank_pattern") or {})
    view_alphas: dict[str, float] = dict(view.get("alpha_pattern") or {})
    default_r, default_alpha = int(view.get("r", 8)), float(view.get("lora_alpha", 8))
    rslora = bool(view.get("use_rslora", False))

    in_view = {key[len(PEFT_KEY_PREFIX) : -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")}
    in_model: set[str] = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.scaling:
            continue
        path = name[len(PEFT_KEY_PREFIX) :] if name.startswith(PEFT_KEY_PREFIX) else name
        in_model.add(path)
        key_b = f"{PEFT_KEY_PREFIX}{path}.lora_B.weight"
        if key_b not in tensors:
            raise ValueError(
                f"load_peft_view: the LoRA adapts {path!r} but the PEFT view in {directory} holds no weights for it; "
                "build the LoRA with to_lora_config / lora_config_from_pretrained of the same adapter."
            )
        rank = int(module.r[adapter_name])
        saved_rank = int(tensors[key_b].shape[1])
        if rank != saved_rank:
            raise ValueError(
                f"load_peft_view: module {path!r} has rank {rank} in the LoRA but {saved_rank} in the PEFT view; "
                "build the LoRA from this adapter's rank map."
            )
        r_view = int(view_ranks.get(path, default_r))
        alpha_view = float(view_alphas.get(path, default_alpha))
        scale_view = alpha_view / (math.sqrt(r_view) if rslora else r_view)
        scale_model = float(module.scaling[adapter_name])
        tensors[key_b] = tensors[key_b] * (scale_view / scale_model)
    missing = sorted(in_view - in_model)
    if missing:
        raise ValueError(
            f"load_peft_view: the PEFT view adapts {missing[:5]} which the LoRA does not (target_modules differ); "
            "build the LoRA with to_lora_config / lora_config_from_pretrained of the same adapter."
        )
    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"load_peft_view: the model has no place for {unexpected[:5]} from {weights_path}.")
    logger.info("Loaded the PEFT view of %s into a LoRA of %d modules.", directory, len(in_model))
    return peft_model
