"""The native view of an adapter folder: compact tensors, reading with validation, restoring into a model.

Native view (exact resume of rank reallocation, needs flexlora_hf):

* `flexlora_config.json`: `FlexLoRAConfig.to_dict()` plus `_capacity` (module path -> slot capacity),
  `_capacity_final`, `_base_model_name_or_path` and `_flexlora_hf_version`.
* `flexlora_adapter.safetensors`: per adapted module `<path>.P` (out, r), `<path>.lam` (r,), `<path>.Q` (r, in) and
  `<path>.slots` (r,) int64 (which slot each direction occupies), plus `modules_to_save.<param path>` for modules
  trained in full (e.g. a classifier head).
* `rank_map.json` (module path -> rank) and `rank_history.json` (`model.rank_history`, possibly empty).

Weights are only ever read with safetensors (no pickle). Nothing here builds a `FlexLoRAModel`; `model.py` does,
with [`read_adapter`], [`check_base_model`] and [`restore`]. Every number and header is validated before a tensor
is allocated (`io/validation.py`), and everything is checked before a model is modified, so a refused folder leaves
the base model (or, for [`load_adapter_into`], the adapted model) exactly as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapter.layer import FlexLoRALayer, is_supported_layer, layer_shape
from ..adapter.targets import check_max_rank_keys, modules_to_save_roots
from ..config import FlexLoRAConfig
from ..constants import (
    FLEXLORA_CONFIG_NAME,
    FLEXLORA_WEIGHTS_NAME,
    MODULES_TO_SAVE_PREFIX,
    RANK_HISTORY_NAME,
    RANK_MAP_NAME,
)
from .atomic import atomic_write
from .validation import (
    check_capacities,
    check_finite,
    check_header,
    check_history,
    check_module_values,
    check_rank_map,
    check_slot_birth,
    fail,
    load_tensors,
    read_header,
    read_json,
    short,
)

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)

# Config fields added after v0.1 -> the behaviour before each existed, for folders that do not name them.
LEGACY_DEFAULTS: dict[str, Any] = {
    "init_basis": "gaussian",
    "svd_prune": False, "grace_events": 0,  # v0.5 and earlier: pruned in place, no grace period
}

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


def _check_base_module(
    base_model: nn.Module, module: str, d_out: int, d_in: int, capacity: int, saved_for: str | None
) -> None:
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
            f"load_flexlora: module {module!r} of the base model is a {type(layer).__name__}, "
            f"not a linear layer{origin}."
        )
    b_in, b_out = layer_shape(layer)
    if (b_out, b_in) != (d_out, d_in):
        raise ValueError(
            f"load_flexlora: shape mismatch for module {module!r}: the adapter was trained on a ({d_out} x {d_in}) "
            f"layer but the base model's layer is ({b_out} x {b_in}){origin}. Load it on the same architecture "
            "(hidden size, intermediate size, heads)."
        )
    _check_capacity_fits(module, capacity, b_out, b_in)


def _check_capacity_fits(module: str, capacity: int, d_out: int, d_in: int) -> None:
    # A slot beyond min(d_in, d_out) can never hold an independent direction; read_adapter already bounds capacities
    # by the saved tensors' shapes, and this repeats it against the layer the slots are really allocated for.
    if capacity > min(d_in, d_out):
        raise ValueError(
            f"load_flexlora: module {module!r} would get {capacity} slots but its ({d_out} x {d_in}) layer allows at "
            f"most {min(d_in, d_out)}; the adapter folder is damaged ({FLEXLORA_CONFIG_NAME} '_capacity')."
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
        capacity (`dict`): module path -> slot capacity to rebuild with (at most min(d_in, d_out)).
        modules_to_save (`dict`): param path (in the adapted base model) -> tensor.
        rank_history (`list`): `rank_history.json` (empty when the file is absent).
        slot_birth (`dict`): module path -> {active slot: optimizer step it was activated at}.
        capacity_final (`bool`): whether the capacities were derived from the run's length.
    """

    directory: str
    config: FlexLoRAConfig
    raw_config: dict[str, Any]
    modules: dict[str, dict[str, torch.Tensor]]
    shapes: dict[str, tuple[int, int]]
    capacity: dict[str, int]
    modules_to_save: dict[str, torch.Tensor]
    rank_history: list[Any]
    slot_birth: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    capacity_final: bool = True

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.raw_config.get("_base_model_name_or_path")
        return str(value) if value else None


def _read_config(
    directory: str, config_overrides: Mapping[str, Any] | None
) -> tuple[dict[str, Any], FlexLoRAConfig]:
    raw = read_json(directory, FLEXLORA_CONFIG_NAME)
    config_path = os.path.join(directory, FLEXLORA_CONFIG_NAME)
    if not isinstance(raw, dict):
        raise fail(config_path, "must hold a JSON object.")
    fields = {k: v for k, v in raw.items() if not k.startswith("_")}
    # Folders written before a field existed keep the behaviour they were trained with (not today's default).
    fields = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in fields}, **fields}
    fields.update(config_overrides or {})
    try:
        config = FlexLoRAConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_flexlora: invalid configuration in {config_path}: {err}") from err
    if not isinstance(raw.get("_capacity_final", True), bool):
        raise fail(config_path, f"'_capacity_final' must be true or false, got {short(raw['_capacity_final'])}.")
    base = raw.get("_base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise fail(config_path, f"'_base_model_name_or_path' must be a string, got {short(base)}.")
    return raw, config


def read_adapter(directory: str, config_overrides: Mapping[str, Any] | None = None) -> SavedAdapter:
    """Read the native files of an adapter folder and check that they agree with each other.

    Every number is checked before anything is allocated from it (see `io/validation.py`): JSON types and ranges,
    then the safetensors header against `rank_map.json` and the capacities against the tensors' own shapes, and
    only then the tensors (whose slots must lie in [0, capacity) and whose values must be finite).

    Raises:
        FileNotFoundError: `flexlora_config.json`, `flexlora_adapter.safetensors` or `rank_map.json` is missing.
        ValueError: a file is corrupt, truncated or holds values of the wrong type or range (the message names the
            file and the module), or the files disagree (ranks, modules, capacities).
    """
    raw, config = _read_config(directory, config_overrides)
    config_path = os.path.join(directory, FLEXLORA_CONFIG_NAME)
    ranks = check_rank_map(read_json(directory, RANK_MAP_NAME), os.path.join(directory, RANK_MAP_NAME))
    history = read_json(directory, RANK_HISTORY_NAME, required=False)
    if history is None:
        logger.info("No %s in %s; the rank history starts empty.", RANK_HISTORY_NAME, directory)
        history = []
    check_history(history, os.path.join(directory, RANK_HISTORY_NAME))

    weights_path = os.path.join(directory, FLEXLORA_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"load_flexlora: {FLEXLORA_WEIGHTS_NAME} is missing from {directory}; it is not a complete FlexLoRA "
            "adapter folder."
        )
    header = read_header(weights_path)
    shapes = check_header(header, weights_path, ranks)  # rank_map.json order is model order (safetensors sorts)
    capacity = check_capacities(raw, config_path, shapes, ranks, config.r)
    slot_birth = check_slot_birth(raw, config_path, ranks)
    try:
        check_max_rank_keys(config, ranks)
    except ValueError as err:
        raise fail(config_path, str(err)) from None

    tensors = load_tensors(weights_path, header)
    modules: dict[str, dict[str, torch.Tensor]] = {m: {} for m in ranks}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(MODULES_TO_SAVE_PREFIX):
            extra[key[len(MODULES_TO_SAVE_PREFIX) :]] = tensor
        else:
            module, _, field = key.rpartition(".")
            modules[module][field] = tensor
    for module, parts in modules.items():
        check_module_values(module, parts, capacity[module], weights_path)
    check_finite(extra.items(), weights_path, "a modules_to_save weight")
    return SavedAdapter(
        directory, config, raw, modules, shapes, capacity, extra, list(history), slot_birth,
        bool(raw.get("_capacity_final", True)),
    )


def _check_modules_to_save(model: nn.Module, saved: SavedAdapter, *, adapted: bool) -> None:
    """Every saved modules_to_save weight must exist in `model` with the same shape and kind of dtype.

    Before injection (`adapted=False`) a weight inside a layer that will be adapted has no `.base_layer` in its path
    yet, so the comparison drops it.
    """
    available = dict(_named_tensors(model))
    for key, tensor in saved.modules_to_save.items():
        name = key if adapted else peft_module_path(key)
        if name not in available:
            raise ValueError(
                f"load_flexlora: the base model {type(model).__name__} has no parameter {name!r} "
                f"(a modules_to_save weight in {FLEXLORA_WEIGHTS_NAME})."
            )
        target = available[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"load_flexlora: shape mismatch for modules_to_save weight {name!r}: saved "
                f"{tuple(tensor.shape)}, base model {tuple(target.shape)} (e.g. another num_labels or hidden size)."
            )
        if target.is_floating_point() != tensor.is_floating_point():
            raise ValueError(
                f"load_flexlora: dtype mismatch for modules_to_save weight {name!r} in {FLEXLORA_WEIGHTS_NAME}: "
                f"saved {tensor.dtype}, base model {target.dtype}; the file is damaged."
            )


def check_base_model(base_model: nn.Module, saved: SavedAdapter) -> None:
    """Check every adapted module and modules_to_save weight of `saved` against a fresh `base_model`, before
    anything is modified: shapes, capacities within min(d_in, d_out) of the base layer, modules_to_save weights.
    Raises `ValueError` naming the module."""
    for module, (d_out, d_in) in saved.shapes.items():
        _check_base_module(base_model, module, d_out, d_in, saved.capacity[module], saved.base_model_name_or_path)
    _check_modules_to_save(base_model, saved, adapted=False)


def restore(model: FlexLoRAModel, saved: SavedAdapter) -> None:
    """Copy the saved adapter tensors, modules_to_save weights and rank history into an adapted model.

    `saved` comes from [`read_adapter`] and was checked against the model (`check_base_model` or
    `load_adapter_into`), so nothing here can fail half-way.
    """
    if saved.modules_to_save:
        _check_modules_to_save(model.get_base_model(), saved, adapted=True)  # before the first layer changes
    for name, layer in model.flexlora_layers():
        parts = saved.modules[name]
        if layer.capacity != saved.capacity[name]:
            layer.set_capacity(saved.capacity[name])  # new Parameter objects: an optimizer built earlier is stale
        # At the same capacity the values are written into the existing Parameters (load_compact zeroes the slots
        # first), so an optimizer that holds them keeps working: the Trainer's resume and best-model reload.
        layer.load_compact(parts["P"], parts["lam"], parts["Q"], parts["slots"])
        layer.slot_birth = dict(saved.slot_birth.get(name, {}))
    if saved.modules_to_save:
        targets = dict(_named_tensors(model.get_base_model()))
        with torch.no_grad():
            for key, tensor in saved.modules_to_save.items():
                targets[key].copy_(tensor)
    model.rank_history = list(saved.rank_history)
    model.capacity_final = saved.capacity_final


def load_adapter_into(model: FlexLoRAModel, path: str | os.PathLike[str]) -> SavedAdapter:
    """Load a saved adapter folder into an existing `FlexLoRAModel` in place (checkpoint resume, best model).

    The model keeps its own configuration and trainability; adapter tensors, slot layout, capacities,
    modules_to_save weights and the rank history become the saved ones. Where a layer already has the saved
    capacity its values are copied into the existing Parameters, so an optimizer that holds them stays valid; where
    the capacity differs the Parameters are replaced, and an optimizer built before holds stale tensors (build it
    after loading).

    Args:
        model (`FlexLoRAModel`): adapted on the same modules as the saved adapter.
        path (`str` or `os.PathLike`): a local adapter folder.

    Returns:
        `SavedAdapter`: what was read (its `config` is the saved configuration, e.g. the run's `total_steps`).

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
        _check_capacity_fits(name, saved.capacity[name], d_out, d_in)
    restore(model, saved)
    logger.info("Loaded FlexLoRA adapter state from %s into the model (total rank %d)", directory, model.total_rank())
    return saved
