"""Saving and loading FlexLoRA adapters: one folder, two views of the same adapter.

This module owns the on-disk format ([`save_flexlora`], [`load_flexlora`]) and the export to a plain PEFT LoRA.

Native view (exact resume of rank reallocation, needs flexlora_hf):

* `flexlora_config.json`: `FlexLoRAConfig.to_dict()` plus `_capacity` (module path -> slot capacity),
  `_capacity_final`, `_base_model_name_or_path` and `_flexlora_hf_version`.
* `flexlora_adapter.safetensors`: per adapted module `<path>.P` (out, r), `<path>.lam` (r,), `<path>.Q` (r, in) and
  `<path>.slots` (r,) int64 (which slot each direction occupies), plus `modules_to_save.<param path>` for modules
  trained in full (e.g. a classifier head).
* `rank_map.json` (module path -> rank) and `rank_history.json` (`model.rank_history`, possibly empty).

PEFT view (stock `PeftModel.from_pretrained(base, folder)`, no flexlora_hf needed):

* `adapter_config.json`: a `LoraConfig` whose `target_modules` is the exact list of adapted module paths with rank
  > 0, with `rank_pattern` = `alpha_pattern` = that rank per module (so PEFT's scale alpha / r is exactly 1).
* `adapter_model.safetensors`: `base_model.model.<path>.lora_A.weight` = Q (r, in) and
  `base_model.model.<path>.lora_B.weight` = P·diag(λ)·scaling (out, r); modules_to_save weights under
  `base_model.model.<param path>` (the names `get_peft_model_state_dict` writes in PEFT 0.21).

Plus `rank_heatmap.png` and a `README.md` model card. Every file is written to a temporary name and moved into place
with `os.replace`, so an interrupted save never leaves a half-written file under a final name. Weights are only
ever read with safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, FlexLoRAConfig
from .layer import FlexLoRALayer, is_supported_layer, layer_shape

if TYPE_CHECKING:
    from .model import FlexLoRAModel

logger = logging.getLogger(__name__)

FLEXLORA_CONFIG_NAME = CONFIG_NAME
FLEXLORA_WEIGHTS_NAME = "flexlora_adapter.safetensors"
RANK_MAP_NAME = "rank_map.json"
RANK_HISTORY_NAME = "rank_history.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
HEATMAP_NAME = "rank_heatmap.png"
MODEL_CARD_NAME = "README.md"

MODULES_TO_SAVE_PREFIX = "modules_to_save."
# PeftModel wraps the base model as `base_model` (LoraModel) whose `model` is the transformers model; saved keys
# carry this prefix and no adapter name (PEFT 0.21 `get_peft_model_state_dict`).
PEFT_KEY_PREFIX = "base_model.model."

# Files `load_flexlora` needs (fetched from the Hub); the PEFT view, card and picture are not read back.
NATIVE_FILES = (FLEXLORA_CONFIG_NAME, FLEXLORA_WEIGHTS_NAME, RANK_MAP_NAME, RANK_HISTORY_NAME)

_COMPACT_FIELDS = ("P", "lam", "Q", "slots")
_ADAPTER_TENSOR_NAMES = {"lora_P", "lora_lam", "lora_Q", "lora_active"}


# ---------------------------------------------------------------------------------------------------------- helpers
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


def _matches(name: str, patterns: list[str]) -> bool:
    # Same rule as FlexLoRAModel / PEFT: exact module path or a `.`-separated suffix of it.
    return any(name == p or name.endswith("." + p) for p in patterns)


def modules_to_save_roots(model: FlexLoRAModel) -> list[str]:
    """Paths of the outermost modules matched by `config.modules_to_save`, in model order."""
    patterns = [str(p) for p in (model.flexlora_config.modules_to_save or [])]
    roots: list[str] = []
    if not patterns:
        return roots
    for name, _ in model.get_base_model().named_modules():
        if name and _matches(name, patterns) and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
    if not roots:
        logger.warning("modules_to_save=%s matches no module of the base model; nothing extra is saved.", patterns)
    return roots


def modules_to_save_state(model: FlexLoRAModel) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of the `modules_to_save` modules, keyed by their path in the base model.

    Tensors are cloned to contiguous CPU copies: safetensors refuses tensors that share storage (tied weights).
    """
    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for root in modules_to_save_roots(model):
        for key, tensor in base.get_submodule(root).state_dict().items():
            if key.rsplit(".", 1)[-1] in _ADAPTER_TENSOR_NAMES:  # saved in compact form with the adapter
                continue
            out[f"{root}.{key}"] = tensor.detach().to("cpu").clone().contiguous()
    return out


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, fsync it, then `os.replace` it onto `path`."""
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _write_json(path: str, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")

    _atomic_write(path, write)


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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


def _version() -> str:
    from . import __version__

    return str(__version__)


# ------------------------------------------------------------------------------------------------------------ views
def native_state(model: FlexLoRAModel) -> dict[str, torch.Tensor]:
    """The tensors of `flexlora_adapter.safetensors`: compact P, λ, Q, slots per module and modules_to_save."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in model.flexlora_layers():
        for key, tensor in layer.compact().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    for key, tensor in modules_to_save_state(model).items():
        tensors[MODULES_TO_SAVE_PREFIX + key] = tensor
    return tensors


def _peft_module_path(param_path: str) -> str:
    # Inside a FlexLoRALayer the wrapped weight lives under `base_layer`; PEFT's names are the original ones.
    return param_path.replace(".base_layer.", ".")


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
    roots = modules_to_save_roots(model)
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
        tensors[PEFT_KEY_PREFIX + _peft_module_path(key)] = tensor

    if not ranks:
        logger.warning("Every adapted module is at rank 0: the PEFT view has no LoRA layer and PEFT cannot load it.")
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else cfg.r
    # PEFT matches a pattern key K against a module path M with re.match(rf"(.*\.)?({K})$", M) and takes the *first*
    # matching key, so a path that is a `.`-suffix of another would capture it: list deeper paths first (a suffix
    # always has fewer components); the sort is stable, so model order is kept among paths of equal depth.
    ordered = sorted(ranks, key=lambda n: -n.count("."))
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


# ------------------------------------------------------------------------------------------------------------- save
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
            training calls this on every rank).
        model_card_kwargs (`dict`, *optional*): keyword arguments for `build_model_card` (`base_model`,
            `datasets`, `metrics`, `eval_results`, `training_args`, `pipeline_tag`, `repo_id`).

    Raises:
        ValueError: `safe_serialization=False`, or `save_directory` is an existing file.
    """
    if not safe_serialization:
        raise ValueError(
            "save_flexlora: FlexLoRA adapters are only saved as safetensors (pickle files can run code when loaded); "
            "drop safe_serialization=False."
        )
    if not is_main_process:
        return
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_flexlora: {save_directory} is a file; pass a folder to save the adapter into.")
    os.makedirs(save_directory, exist_ok=True)
    base = model.get_base_model()
    version = _version()

    # Weights first, then the JSON that describes them; the picture and the card last (they are derived data).
    tensors = native_state(model)
    # One metadata key only: safetensors writes several in no fixed order, and identical saves should give identical
    # bytes (the Hub then skips a re-upload). The version is in flexlora_config.json.
    _write_safetensors(os.path.join(save_directory, FLEXLORA_WEIGHTS_NAME), tensors, {"format": "pt"})
    peft_config, peft_tensors = peft_export(model)
    _write_safetensors(os.path.join(save_directory, PEFT_WEIGHTS_NAME), peft_tensors, {"format": "pt"})
    _write_json(os.path.join(save_directory, PEFT_CONFIG_NAME), peft_config)

    rank_map = model.rank_map()
    _write_json(os.path.join(save_directory, RANK_MAP_NAME), rank_map)
    _write_json(os.path.join(save_directory, RANK_HISTORY_NAME), list(model.rank_history))
    config = model.flexlora_config.to_dict()
    config["_capacity"] = model.rank_caps()
    config["_capacity_final"] = bool(getattr(model, "capacity_final", True))
    config["_base_model_name_or_path"] = base_model_name_or_path(base)
    config["_flexlora_hf_version"] = version
    _write_json(os.path.join(save_directory, FLEXLORA_CONFIG_NAME), config)

    from .model_card import build_model_card
    from .plotting import plot_rank_history

    def draw(tmp: str) -> None:
        plot_rank_history(model, tmp)

    _atomic_write(os.path.join(save_directory, HEATMAP_NAME), draw)
    card = build_model_card(model, **dict(model_card_kwargs or {}))
    _write_text(os.path.join(save_directory, MODEL_CARD_NAME), str(card))
    logger.info(
        "Saved FlexLoRA adapter (%d matrices, total rank %d) to %s",
        len(rank_map),
        sum(rank_map.values()),
        save_directory,
    )


# ------------------------------------------------------------------------------------------------------------- load
def _looks_like_local_path(path: str) -> bool:
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.endswith(("/", os.sep))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
    )


def _resolve_directory(path_or_repo_id: str, *, revision: str | None, token: str | bool | None) -> str:
    """A local folder as is; otherwise download the native files of a Hub repo (honouring revision and token)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id):
        raise NotADirectoryError(
            f"load_flexlora: {path_or_repo_id} is a file; pass the adapter folder (with {FLEXLORA_CONFIG_NAME}) or "
            "a Hub repo id."
        )
    if _looks_like_local_path(path_or_repo_id):
        raise FileNotFoundError(f"load_flexlora: no adapter folder at {path_or_repo_id}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return str(
            snapshot_download(
                repo_id=path_or_repo_id, revision=revision, token=token, allow_patterns=list(NATIVE_FILES)
            )
        )
    except HFValidationError as err:
        raise ValueError(
            f"load_flexlora: {path_or_repo_id!r} is neither an existing folder nor a valid Hub repo id ({err})."
        ) from err


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
        name = key if adapted else _peft_module_path(key)
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


@torch.no_grad()
def _set_capacity(layer: FlexLoRALayer, capacity: int) -> None:
    """Give `layer` exactly `capacity` slots (contents are overwritten by `load_compact` right after)."""
    if capacity > layer.capacity:
        layer.grow_capacity(capacity)
    elif capacity < layer.capacity:
        # Resume must reproduce the checkpoint's parameter shapes: optimizer.pt holds moments of that size.
        grad = layer.lora_P.requires_grad
        layer.lora_P = nn.Parameter(layer.lora_P.new_zeros(layer.out_features, capacity), requires_grad=grad)
        layer.lora_lam = nn.Parameter(layer.lora_lam.new_zeros(capacity), requires_grad=grad)
        layer.lora_Q = nn.Parameter(layer.lora_Q.new_zeros(capacity, layer.in_features), requires_grad=grad)
        layer.lora_active = torch.zeros(capacity, dtype=torch.bool, device=layer.lora_active.device)


def _restore(model: FlexLoRAModel, saved: SavedAdapter) -> None:
    """Copy the saved adapter tensors, modules_to_save weights and rank history into an adapted model."""
    for name, layer in model.flexlora_layers():
        parts = saved.modules[name]
        _set_capacity(layer, saved.capacity[name])
        layer.load_compact(parts["P"], parts["lam"], parts["Q"], parts["slots"])
    if saved.modules_to_save:
        _check_modules_to_save(model.get_base_model(), saved, adapted=True)
        targets = dict(_named_tensors(model.get_base_model()))
        with torch.no_grad():
            for key, tensor in saved.modules_to_save.items():
                targets[key].copy_(tensor)
    model.rank_history = list(saved.rank_history)
    model.capacity_final = bool(saved.raw_config.get("_capacity_final", True))


def load_flexlora(
    base_model: nn.Module,
    path_or_repo_id: str | os.PathLike[str],
    *,
    is_trainable: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> FlexLoRAModel:
    """Rebuild a saved FlexLoRA adapter on `base_model`, exactly (same outputs, ranks, slots and rank history).

    Args:
        base_model (`nn.Module`): a fresh base model of the architecture the adapter was trained on.
        path_or_repo_id (`str` or `os.PathLike`): folder written by [`save_flexlora`], or a Hub repo id.
        is_trainable (`bool`, *optional*, defaults to `False`): if `False` every parameter is frozen and the model
            is put in eval mode; if `True` the adapter and `modules_to_save` are trainable, as after
            `get_flexlora_model`.
        revision (`str`, *optional*): branch, tag or commit of the Hub repo.
        token (`str` or `bool`, *optional*): Hub token for private repos (never written anywhere).
        config_overrides (`dict`, *optional*): `FlexLoRAConfig` fields to change (e.g. a new `total_steps` to
            continue training).

    Returns:
        `FlexLoRAModel`

    Raises:
        FileNotFoundError: a required file is missing.
        ValueError: corrupt/truncated file, base model without an adapted module or with other shapes, or files that
            disagree with each other; the message names the file or module and the cause.
    """
    from .model import FlexLoRAModel

    directory = _resolve_directory(os.fspath(path_or_repo_id), revision=revision, token=token)
    saved = read_adapter(directory, config_overrides)
    # Check everything against the base model before modifying it.
    for module, (d_out, d_in) in saved.shapes.items():
        _check_base_module(base_model, module, d_out, d_in, saved.base_model_name_or_path)
    _check_modules_to_save(base_model, saved, adapted=False)

    # Build on exactly the saved modules with the saved capacities, then restore the user-facing config values so
    # that re-saving round-trips them and `finalize_capacity` keeps its meaning.
    config = saved.config
    build_config = dataclasses.replace(config, target_modules=list(saved.modules), max_rank=dict(saved.capacity))  # type: ignore[arg-type]  # per-module caps
    model = FlexLoRAModel(base_model, build_config)
    if set(model.module_names) != set(saved.modules):
        unexpected = sorted(set(model.module_names) - set(saved.modules))
        raise ValueError(f"load_flexlora: the base model adapted unexpected modules {unexpected[:5]}.")
    model.flexlora_config.target_modules = config.target_modules
    model.flexlora_config.max_rank = config.max_rank
    _restore(model, saved)

    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    logger.info(
        "Loaded FlexLoRA adapter (%d matrices, total rank %d) from %s",
        len(saved.modules),
        model.total_rank(),
        directory,
    )
    return model


def load_adapter_into(model: FlexLoRAModel, path: str | os.PathLike[str]) -> None:
    """Load a saved adapter folder into an existing `FlexLoRAModel` in place (checkpoint resume, best model).

    The model keeps its own configuration and trainability; adapter tensors, slot layout, capacities,
    modules_to_save weights and the rank history become the saved ones. Call it before the optimizer is created
    when a capacity has to change (that replaces the Parameter objects).

    Args:
        model (`FlexLoRAModel`): adapted on the same modules as the saved adapter.
        path (`str` or `os.PathLike`): a local adapter folder.

    Raises:
        FileNotFoundError / ValueError: as [`load_flexlora`]; also when the model adapts other modules.
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
    _restore(model, saved)
    logger.info("Loaded FlexLoRA adapter state from %s into the model (total rank %d)", directory, model.total_rank())
