"""The native view of an adapter folder: compact tensors, reading with validation, restoring into a model.

Native view (exact resume of rank reallocation, needs flexlora_hf):

* `flexlora_config.json`: `FlexLoRAConfig.to_dict()` plus `_capacity` (module path -> slot capacity),
  `_capacity_final`, `_base_model_name_or_path` and `_flexlora_hf_version`.
* `flexlora_adapter.safetensors`: per adapted module `<path>.P` (out, r), `<path>.lam` (r,), `<path>.Q` (r, in) and
  `<path>.slots` (r,) int64 (which slot each direction occupies), plus `modules_to_save.<param path>` for modules
  trained in full (e.g. a classifier head).
* `rank_map.json` (module path -> rank) and `rank_history.json` (`model.rank_history`, possibly empty).

Weights are only ever read with safetensors (no pickle). Nothing here builds a `FlexLoRAModel`; `model.py` does,
with [`read_adapter`], [`check_base_model`] and [`restore`].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import FlexLoRAConfig
from ..constants import (
    FLEXLORA_CONFIG_NAME,
    FLEXLORA_WEIGHTS_NAME,
    MODULES_TO_SAVE_PREFIX,
    RANK_HISTORY_NAME,
    RANK_MAP_NAME,
)
from ..layer import FlexLoRALayer, is_supported_layer, layer_shape
from ..targets import modules_to_save_roots
from .atomic import atomic_write

if TYPE_CHECKING:
    from ..model import FlexLoRAModel

logger = logging.getLogger(__name__)

_COMPACT_FIELDS = ("P", "lam", "Q", "slots")
_ADAPTER_TENSOR_NAMES = {"lora_P", "lora_lam", "lora_Q", "lora_active"}


def peft_module_path(param_path: str) -> str:
    """A parameter path as PEFT names it: inside a FlexLoRALayer the wrapped weight lives under `base_layer`."""
    return param_path.replace(".base_layer.", ".")


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def modules_to_save_state(model: FlexLoRAModel) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of the `modules_to_save` modules, keyed by their path in the base model.

    Tensors are cloned to contiguous CPU copies: safetensors refuses tensors that share storage (tied weights).
    """
    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for root in modules_to_save_roots(base, model.flexlora_config.modules_to_save):
        for key, tensor in base.get_submodule(root).state_dict().items():
            if key.rsplit(".", 1)[-1] in _ADAPTER_TENSOR_NAMES:  # saved in compact form with the adapter
                continue
            out[f"{root}.{key}"] = tensor.detach().to("cpu").clone().contiguous()
    return out


def native_state(model: FlexLoRAModel) -> dict[str, torch.Tensor]:
    """The tensors of `flexlora_adapter.safetensors`: compact P, λ, Q, slots per module and modules_to_save."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in model.flexlora_layers():
        for key, tensor in layer.compact().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    for key, tensor in modules_to_save_state(model).items():
        tensors[MODULES_TO_SAVE_PREFIX + key] = tensor
    return tensors


def _read_json(directory: str, name: str, *, required: bool = True) -> Any:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(
                f"load_flexlora: {name} is missing from {directory}; it is not a complete FlexLoRA adapter folder "
                "(save it again with save_pretrained / save_flexlora)."
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_flexlora: {path} is not valid JSON ({err}); the file is corrupt or truncated.") from err


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_flexlora: {os.path.basename(path)} is missing from {os.path.dirname(path)}; it is not a complete "
            "FlexLoRA adapter folder."
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"load_flexlora: cannot read {path} ({err}); the file is truncated or corrupt. Save or download the "
            "adapter again."
        ) from err


def _split_native(
    tensors: Mapping[str, torch.Tensor], path: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group `<module>.{P,lam,Q,slots}` by module and collect `modules_to_save.*`; check every module is complete."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(MODULES_TO_SAVE_PREFIX):
            extra[key[len(MODULES_TO_SAVE_PREFIX) :]] = tensor
            continue
        module, _, field = key.rpartition(".")
        if not module or field not in _COMPACT_FIELDS:
            raise ValueError(f"load_flexlora: unexpected tensor {key!r} in {path}.")
        modules.setdefault(module, {})[field] = tensor
    for module, parts in modules.items():
        missing = [f for f in _COMPACT_FIELDS if f not in parts]
        if missing:
            raise ValueError(f"load_flexlora: {path} lacks {', '.join(missing)} for module {module!r}.")
    return modules, extra


def _check_compact(module: str, parts: Mapping[str, torch.Tensor], path: str) -> tuple[int, int, int]:
    """Check the shapes of one module's compact tensors; returns (rank, d_out, d_in)."""
    P, lam, Q, slots = (parts[f] for f in _COMPACT_FIELDS)
    if lam.dim() != 1 or P.dim() != 2 or Q.dim() != 2 or slots.dim() != 1:
        raise ValueError(
            f"load_flexlora: module {module!r} in {path} has tensors of the wrong dimensionality "
            f"(P {tuple(P.shape)}, lam {tuple(lam.shape)}, Q {tuple(Q.shape)}, slots {tuple(slots.shape)})."
        )
    r = int(lam.shape[0])
    if P.shape[1] != r or Q.shape[0] != r or slots.shape[0] != r:
        raise ValueError(
            f"load_flexlora: module {module!r} in {path} has inconsistent ranks: P {tuple(P.shape)}, "
            f"lam {tuple(lam.shape)}, Q {tuple(Q.shape)}, slots {tuple(slots.shape)}."
        )
    if slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise ValueError(f"load_flexlora: module {module!r} in {path} has non-integer slots ({slots.dtype}).")
    if r and (int(slots.min()) < 0 or len(set(slots.tolist())) != r):
        raise ValueError(f"load_flexlora: module {module!r} in {path} has invalid slots {slots.tolist()}.")
    return r, int(P.shape[0]), int(Q.shape[1])


def _check_base_module(base_model: nn.Module, module: str, d_out: int, d_in: int, saved_for: str | None) -> None:
    origin = f" (the adapter was saved for {saved_for})" if saved_for else ""
    try:
        layer = base_model.get_submodule(module)
    except AttributeError as err:
        raise ValueError(
            f"load_flexlora: the base model {type(base_model).__name__} has no module {module!r}, which the adapter "
            f"adapts{origin}. Load the adapter on the base model it was trained on."
        ) from err
    if isinstance(layer, FlexLoRALayer):
        raise ValueError(
            f"load_flexlora: module {module!r} of the base model already carries a FlexLoRA adapter; load onto a "
            "fresh base model."
        )
    if not is_supported_layer(layer):
        raise ValueError(
            f"load_flexlora: module {module!r} of the base model is a {type(layer).__name__}, not a linear layer{origin}."
        )
    b_in, b_out = layer_shape(layer)
    if (b_out, b_in) != (d_out, d_in):
        raise ValueError(
            f"load_flexlora: shape mismatch for module {module!r}: the adapter was trained on a ({d_out} x {d_in}) "
            f"layer but the base model's layer is ({b_out} x {b_in}){origin}. Load it on the same architecture "
            "(hidden size, intermediate size, heads)."
        )


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


@dataclasses.dataclass
class SavedAdapter:
    """The native view of an adapter folder, read and checked for internal consistency (not yet against a model).

    Attributes:
        directory (`str`): the local folder (a Hub snapshot for a repo id).
        config (`FlexLoRAConfig`): the saved configuration (with any overrides applied).
        raw_config (`dict`): `flexlora_config.json` as read, underscore keys included.
        modules (`dict`): module path -> {"P", "lam", "Q", "slots"}, in model order (the order of `rank_map.json`).
        shapes (`dict`): module path -> (d_out, d_in).
        capacity (`dict`): module path -> slot capacity to rebuild with.
        modules_to_save (`dict`): param path (in the adapted base model) -> tensor.
        rank_history (`list`): `rank_history.json` (empty when the file is absent).
    """

    directory: str
    config: FlexLoRAConfig
    raw_config: dict[str, Any]
    modules: dict[str, dict[str, torch.Tensor]]
    shapes: dict[str, tuple[int, int]]
    capacity: dict[str, int]
    modules_to_save: dict[str, torch.Tensor]
    rank_history: list[Any]

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.raw_config.get("_base_model_name_or_path")
        return str(value) if value else None


def read_adapter(directory: str, config_overrides: Mapping[str, Any] | None = None) -> SavedAdapter:
    """Read the native files of an adapter folder and check that they agree with each other.

    Raises:
        FileNotFoundError: `flexlora_config.json`, `flexlora_adapter.safetensors` or `rank_map.json` is missing.
        ValueError: a file is corrupt or truncated, or the files disagree (ranks, modules, capacities).
    """
    raw = _read_json(directory, FLEXLORA_CONFIG_NAME)
    config_path = os.path.join(directory, FLEXLORA_CONFIG_NAME)
    if not isinstance(raw, dict):
        raise ValueError(f"load_flexlora: {config_path} must hold a JSON object.")
    saved_capacity = raw.get("_capacity")
    if not isinstance(saved_capacity, dict):
        raise ValueError(f"load_flexlora: {config_path} has no '_capacity' mapping (module path -> slot capacity).")
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    fields.update(config_overrides or {})
    try:
        config = FlexLoRAConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_flexlora: invalid configuration in {config_path}: {err}") from err

    rank_map = _read_json(directory, RANK_MAP_NAME)
    if not isinstance(rank_map, dict):
        raise ValueError(f"load_flexlora: {os.path.join(directory, RANK_MAP_NAME)} must hold a JSON object.")
    history = _read_json(directory, RANK_HISTORY_NAME, required=False)
    if history is None:
        logger.info("No %s in %s; the rank history starts empty.", RANK_HISTORY_NAME, directory)
        history = []
    if not isinstance(history, list):
        raise ValueError(f"load_flexlora: {os.path.join(directory, RANK_HISTORY_NAME)} must hold a JSON list.")

    weights_path = os.path.join(directory, FLEXLORA_WEIGHTS_NAME)
    found, extra = _split_native(_read_safetensors(weights_path), weights_path)

    # Every file must describe the same set of modules with the same ranks.
    for module in rank_map:
        if module not in found:
            raise ValueError(
                f"load_flexlora: {RANK_MAP_NAME} lists module {module!r} but {FLEXLORA_WEIGHTS_NAME} holds no tensors "
                "for it; the folder mixes files from different saves."
            )
    for module in found:
        if module not in rank_map:
            raise ValueError(
                f"load_flexlora: module {module!r} of {FLEXLORA_WEIGHTS_NAME} is missing from {RANK_MAP_NAME}."
            )
    # rank_map.json keeps model order (safetensors sorts its keys): check and build in that order.
    modules = {module: found[module] for module in rank_map}
    shapes: dict[str, tuple[int, int]] = {}
    capacity: dict[str, int] = {}
    for module, parts in modules.items():
        r, d_out, d_in = _check_compact(module, parts, weights_path)
        if int(rank_map[module]) != r:
            raise ValueError(
                f"load_flexlora: {RANK_MAP_NAME} says module {module!r} has rank {rank_map[module]} but "
                f"{FLEXLORA_WEIGHTS_NAME} holds {r} directions for it; the folder mixes files from different saves."
            )
        if module not in saved_capacity:
            raise ValueError(f"load_flexlora: module {module!r} has no '_capacity' entry in {FLEXLORA_CONFIG_NAME}.")
        need = int(parts["slots"].max()) + 1 if r else 0
        shapes[module] = (d_out, d_in)
        capacity[module] = max(int(saved_capacity[module]), need, config.r)
    return SavedAdapter(directory, config, raw, modules, shapes, capacity, extra, list(history))


def _check_modules_to_save(model: nn.Module, saved: SavedAdapter, *, adapted: bool) -> None:
    """Every saved modules_to_save weight must exist in `model` with the same shape.

    Before injection (`adapted=False`) a weight inside a layer that will be adapted has no `.base_layer` in its path
    yet, so the comparison drops it.
    """
    available = {k: tuple(t.shape) for k, t in _named_tensors(model)}
    for key, tensor in saved.modules_to_save.items():
        name = key if adapted else peft_module_path(key)
        if name not in available:
            raise ValueError(
                f"load_flexlora: the base model {type(model).__name__} has no parameter {name!r} "
                f"(a modules_to_save weight in {FLEXLORA_WEIGHTS_NAME})."
            )
        if available[name] != tuple(tensor.shape):
            raise ValueError(
                f"load_flexlora: shape mismatch for modules_to_save weight {name!r}: saved "
                f"{tuple(tensor.shape)}, base model {available[name]} (e.g. another num_labels or hidden size)."
            )


def check_base_model(base_model: nn.Module, saved: SavedAdapter) -> None:
    """Check every adapted module and modules_to_save weight of `saved` against a fresh `base_model`, before
    anything is modified. Raises `ValueError` naming the module."""
    for module, (d_out, d_in) in saved.shapes.items():
        _check_base_module(base_model, module, d_out, d_in, saved.base_model_name_or_path)
    _check_modules_to_save(base_model, saved, adapted=False)


def restore(model: FlexLoRAModel, saved: SavedAdapter) -> None:
    """Copy the saved adapter tensors, modules_to_save weights and rank history into an adapted model."""
    for name, layer in model.flexlora_layers():
        parts = saved.modules[name]
        layer.set_capacity(saved.capacity[name])
        layer.load_compact(parts["P"], parts["lam"], parts["Q"], parts["slots"])
        births = saved.raw_config.get("_slot_birth", {}).get(name, {})
        layer.slot_birth = {int(s): int(b) for s, b in births.items() if int(s) < layer.rank}
    if saved.modules_to_save:
        _check_modules_to_save(model.get_base_model(), saved, adapted=True)
        targets = dict(_named_tensors(model.get_base_model()))
        with torch.no_grad():
            for key, tensor in saved.modules_to_save.items():
                targets[key].copy_(tensor)
    model.rank_history = list(saved.rank_history)
    model.capacity_final = bool(saved.raw_config.get("_capacity_final", True))

def load_adapter_into(model: FlexLoRAModel, path: str | os.PathLike[str]) -> None:
    """Load a saved adapter folder into an existing `FlexLoRAModel` in place (checkpoint resume, best model).

    The model keeps its own configuration and trainability; adapter tensors, slot layout, capacities,
    modules_to_save weights and the rank history become the saved ones. Call it before the optimizer is created
    when a capacity has to change (that replaces the Parameter objects).

    Args:
        model (`FlexLoRAModel`): adapted on the same modules as the saved adapter.
        path (`str` or `os.PathLike`): a local adapter folder.

    Raises:
        FileNotFoundError / ValueError: as `FlexLoRAModel.from_pretrained`; also when the model adapts other modules.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter_into: no adapter folder at {directory}.")
    saved = read_adapter(directory)
    names = model.module_names
    if set(names) != set(saved.modules):
        missing = [n for n in saved.modules if n not in names]
        extra = [n for n in names if n not in saved.modules]
        raise ValueError(
            f"load_adapter_into: the model adapts other modules than the adapter in {directory}: "
            f"not adapted here {missing[:5]}, not in the adapter {extra[:5]}."
        )
    for name, layer in model.flexlora_layers():
        d_out, d_in = saved.shapes[name]
        if (layer.out_features, layer.in_features) != (d_out, d_in):
            raise ValueError(
                f"load_adapter_into: shape mismatch for module {name!r}: the adapter was trained on a ({d_out} x "
                f"{d_in}) layer but the model's layer is ({layer.out_features} x {layer.in_features})."
            )
    restore(model, saved)
    logger.info("Loaded FlexLoRA adapter state from %s into the model (total rank %d)", directory, model.total_rank())
