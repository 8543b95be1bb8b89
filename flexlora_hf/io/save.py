"""Save orchestration: one folder with the native view, the PEFT view, the rank map and history, heatmap and card.

Weights first, then the JSON that describes them, then the derived files (heatmap, model card). Every file is
written atomically (`io.atomic`), so an interrupted save never leaves a half-written file under a final name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..adapter.targets import modules_to_save_roots
from ..constants import (
    FLEXLORA_CONFIG_NAME,
    FLEXLORA_WEIGHTS_NAME,
    MODEL_CARD_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    RANK_MAP_NAME,
    __version__,
)
from ..distributed.sharding import gathered, uses_fsdp2
from .atomic import write_json, write_text
from .history import write_rank_history
from .native import native_state, write_safetensors
from .peft_view import base_model_name_or_path, peft_export

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)


def save_flexlora(
    model: FlexLoRAModel,
    save_directory: str | os.PathLike[str],
    *,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Save a FlexLoRA adapter as one folder with a native view and a plain PEFT LoRA view.

    Args:
        model (`FlexLoRAModel`): the adapted model.
        save_directory (`str` or `os.PathLike`): folder to write (created if needed; existing files are replaced).
        safe_serialization (`bool`, *optional*, defaults to `True`): kept for `save_pretrained` compatibility;
            weights are always safetensors, and `False` raises.
        is_main_process (`bool`, *optional*, defaults to `True`): only the main process writes (distributed
            training calls this on every rank). Under FSDP2 every process must call it (the adapter is gathered);
            process 0 writes.
        model_card_kwargs (`dict`, *optional*): keyword arguments for `build_model_card` (`base_model`,
            `datasets`, `metrics`, `eval_results`, `training_args`, `pipeline_tag`, `repo_id`). `base_model` (a Hub
            id) also becomes `base_model_name_or_path` in `adapter_config.json` and `flexlora_config.json`.

    Raises:
        ValueError: `safe_serialization=False`, or `save_directory` is an existing file.
    """
    if not safe_serialization:
        raise ValueError(
            "save_flexlora: FlexLoRA adapters are only saved as safetensors (pickle files can run code when loaded); "
            "drop safe_serialization=False."
        )
    layers = [layer for _, layer in model.flexlora_layers()]
    if uses_fsdp2(model, layers):  # every process gathers (a collective) the adapter and modules_to_save; 0 writes
        import torch.distributed as dist

        base = model.get_base_model()
        extra = [base.get_submodule(r) for r in modules_to_save_roots(base, model.flexlora_config.modules_to_save)]
        main = is_main_process and (not dist.is_initialized() or dist.get_rank() == 0)
        with gathered(layers, extra_modules=extra):
            _save(model, save_directory, main, model_card_kwargs)
        return
    _save(model, save_directory, is_main_process, model_card_kwargs)


def _save(
    model: FlexLoRAModel, save_directory: str | os.PathLike[str], is_main_process: bool,
    model_card_kwargs: Mapping[str, Any] | None,
) -> None:
    if not is_main_process:
        return
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_flexlora: {save_directory} is a file; pass a folder to save the adapter into.")
    os.makedirs(save_directory, exist_ok=True)
    base = model.get_base_model()

    # Weights first, then the JSON that describes them; the picture and the card last (they are derived data).
    tensors = native_state(model)
    # One metadata key only: safetensors writes several in no fixed order, and identical saves should give identical
    # bytes (the Hub then skips a re-upload). The version is in flexlora_config.json.
    write_safetensors(os.path.join(save_directory, FLEXLORA_WEIGHTS_NAME), tensors, {"format": "pt"})
    peft_config, peft_tensors = peft_export(model)
    # A base model named by the caller (its Hub id, e.g. when it was loaded from a local folder) wins over the path
    # its config remembers, in the PEFT view and in the native config alike.
    named_base = (model_card_kwargs or {}).get("base_model")
    if named_base:
        peft_config["base_model_name_or_path"] = str(named_base)
    write_safetensors(os.path.join(save_directory, PEFT_WEIGHTS_NAME), peft_tensors, {"format": "pt"})
    write_json(os.path.join(save_directory, PEFT_CONFIG_NAME), peft_config)

    rank_map = model.rank_map()
    write_json(os.path.join(save_directory, RANK_MAP_NAME), rank_map)
    config = model.flexlora_config.to_dict()
    config["_capacity"] = model.rank_caps()
    config["_capacity_final"] = bool(getattr(model, "capacity_final", True))
    # optimizer step at which each young direction started (per-direction Adam correction, exact resume)
    config["_slot_birth"] = {
        name: {str(slot): step for slot, step in sorted(layer.slot_birth.items())}
        for name, layer in model.flexlora_layers()
        if layer.slot_birth
    }
    config["_base_model_name_or_path"] = str(named_base) if named_base else base_model_name_or_path(base)
    config["_flexlora_hf_version"] = __version__
    write_json(os.path.join(save_directory, FLEXLORA_CONFIG_NAME), config)

    write_rank_history(model, save_directory)
    from .model_card import build_model_card  # the card sits above the I/O layer (it reads the saved views)

    card = build_model_card(model, **dict(model_card_kwargs or {}))
    write_text(os.path.join(save_directory, MODEL_CARD_NAME), str(card))
    logger.info(
        "Saved FlexLoRA adapter (%d matrices, total rank %d) to %s",
        len(rank_map),
        sum(rank_map.values()),
        save_directory,
    )


