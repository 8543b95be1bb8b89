"""QLoRA-style base models for FlexLoRA: 4-bit loading, k-bit training preparation and the bitsandbytes CPU guard.

This module owns everything between a model id / folder and a base model that is ready for `get_flexlora_model`:

* [`load_base_model`] loads a transformers model either in full precision or in 4-bit NF4 with double quantisation
  (the QLoRA recipe) through `quantization_config=BitsAndBytesConfig(...)` (transformers 5.x rejects the old
  `load_in_4bit=` keyword), runs PEFT's `prepare_model_for_kbit_training` (frozen base, fp32 norms, gradient
  checkpointing, input gradients) and applies [`guard_bnb_cpu`].
* [`guard_bnb_cpu`] works around a silent bitsandbytes 0.50 defect on CPUs with AVX512-BF16: the first forward of a
  `Linear4bit` in eval mode without gradients (e.g. `Trainer.evaluate()`) permanently repacks its weight into an
  inference-only layout, and every backward afterwards gets **no gradient at all** through that layer, without any
  error (the Trainer reports `grad_norm` 0 after the first evaluation). The guard switches that path off and restores
  weights that were already repacked. `FlexLoRAModel` applies it to every model it wraps, so a 4-bit model loaded by
  the user directly is covered too.

Merging an adapter into a 4-bit base is refused (see `merging.merged_base_layer`): merge into a full-precision
copy of the base instead.

bitsandbytes is optional (`pip install flexlora_hf[quantization]`); this module imports it lazily.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer import is_linear4bit

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install flexlora_hf[quantization]"



def require_bitsandbytes() -> Any:
    """Import and return `bitsandbytes`, or raise an `ImportError` that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"4-bit loading needs bitsandbytes, which is not installed. Install it with `{INSTALL_HINT}`."
        ) from err
    return bitsandbytes


def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """Compute dtype of the 4-bit matmuls: bf16 on CUDA (fp16 if the GPU lacks bf16), fp32 on CPU.

    Args:
        device (`str` or `torch.device`, *optional*): target device; defaults to CUDA when available, else CPU.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def make_bnb_config(compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig:
    """The QLoRA quantisation config: NF4, double quantisation, `compute_dtype` (default: [`default_compute_dtype`])."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if compute_dtype is not None else default_compute_dtype(),
    )


def _unpack_cpu_weight(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repacking of a `Linear4bit` weight in place. Returns whether it was packed."""
    weight: Any = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return False
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as err:  # pragma: no cover - a bitsandbytes that packs always ships the inverse
        raise RuntimeError(
            "A bitsandbytes 4-bit layer was already repacked for CPU inference and this bitsandbytes version offers "
            "no way back; gradients would not flow through it. Reload the model and apply guard_bnb_cpu (or wrap it "
            "with get_flexlora_model) before any evaluation."
        ) from err
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
    return True


def guard_bnb_cpu(model: nn.Module) -> int:
    """Disable bitsandbytes' CPU inference repacking on every 4-bit linear layer of `model`.

    bitsandbytes 0.50 repacks a `Linear4bit` weight for AVX512-BF16 inference the first time the layer runs on CPU in
    eval mode without gradients; afterwards no gradient flows through that layer, silently (LoRA parameters behind it
    get `grad is None`, the Trainer logs `grad_norm` 0). This sets `support_avx512bf16_for_cpu = False` on each layer
    and converts weights that were already repacked back to the training layout (bitsandbytes' own inverse; with
    double quantisation the absmax statistics are re-quantised, a change far below the 4-bit rounding error).

    Safe to call several times and on models without 4-bit layers. On GPU it changes nothing.

    Args:
        model (`nn.Module`): any module tree.

    Returns:
        `int`: number of 4-bit layers guarded.
    """
    count = 0
    unpacked = 0
    for module in model.modules():
        if not is_linear4bit(module) or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (nn.Module __setattr__ typing)
        count += 1
        if _unpack_cpu_weight(module):
            unpacked += 1
    if unpacked:
        logger.warning(
            "guard_bnb_cpu: %d bitsandbytes 4-bit layers had already been repacked for CPU inference (an eval-mode "
            "forward ran before the guard); restored them so gradients flow again.",
            unpacked,
        )
    if count:
        logger.debug("guard_bnb_cpu: disabled CPU inference repacking on %d bitsandbytes 4-bit layers.", count)
    return count


def _default_device_map() -> dict[str, Any] | None:
    """Whole model on this process's GPU (LOCAL_RANK under torchrun/accelerate); None on CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return None


def load_base_model(
    model_id_or_path: str | os.PathLike,
    *,
    load_in_4bit: bool = False,
    model_class: Any = None,
    compute_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a base model ready for `get_flexlora_model`, optionally in 4-bit NF4 (QLoRA).

    With `load_in_4bit=True` the model is loaded with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=
    "nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)` and prepared with PEFT's
    `prepare_model_for_kbit_training` (base frozen, norms and other non-quantised weights in fp32, input gradients,
    gradient checkpointing if asked), then [`guard_bnb_cpu`] is applied. Without it the model is loaded in
    `compute_dtype`, frozen, and gradient checkpointing + input gradients are enabled if asked.

    Args:
        model_id_or_path (`str` or `os.PathLike`): Hub id or local folder.
        load_in_4bit (`bool`, *optional*, defaults to `False`): quantise the linear layers to 4-bit NF4.
        model_class (*optional*, `AutoModelForCausalLM` when `None`): any `Auto*` / model class with
            `from_pretrained`, e.g. `AutoModelForSequenceClassification`.
        compute_dtype (`torch.dtype`, *optional*): dtype of the 4-bit matmuls and of the full-precision weights;
            bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 on CPU by default.
        gradient_checkpointing (`bool`, *optional*, defaults to `True`): trade compute for activation memory.
        gradient_checkpointing_kwargs (`dict`, *optional*): passed to `gradient_checkpointing_enable`; defaults to
            `{"use_reentrant": False}`.
        **kwargs: passed to `model_class.from_pretrained` (e.g. `device_map`, `attn_implementation`, `num_labels`).
            Do not pass `load_in_4bit`/`quantization_config` here; transformers 5.x rejects `load_in_4bit=`.

    Returns:
        `nn.Module`: the frozen base model.

    Raises:
        ImportError: if `load_in_4bit=True` and bitsandbytes is not installed.
        ValueError: if `quantization_config` is passed together with `load_in_4bit=True`.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    if compute_dtype is None:
        compute_dtype = default_compute_dtype()
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    kwargs.setdefault("dtype", compute_dtype)
    gc_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})

    if load_in_4bit:
        require_bitsandbytes()
        if kwargs.get("quantization_config") is not None:
            raise ValueError(
                "load_base_model: pass either load_in_4bit=True (the QLoRA NF4 config is built for you) or your own "
                "quantization_config=..., not both."
            )
        from peft import prepare_model_for_kbit_training

        if "device_map" not in kwargs and (device_map := _default_device_map()) is not None:
            kwargs["device_map"] = device_map
        model = model_class.from_pretrained(
            model_id_or_path, quantization_config=make_bnb_config(compute_dtype), **kwargs
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
        if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # PEFT skips it with use_reentrant=False; harmless either way
        n = guard_bnb_cpu(model)
        logger.info(
            "Loaded %s in 4-bit NF4 (%d quantised linear layers, compute dtype %s).", model_id_or_path, n, compute_dtype
        )
    else:
        model = model_class.from_pretrained(model_id_or_path, **kwargs)
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
            if enable is not None:
                enable(activation_checkpointing_kwargs=gc_kwargs)
            else:  # pragma: no cover - older transformers
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        logger.info("Loaded %s in %s.", model_id_or_path, kwargs["dtype"])
    if gradient_checkpointing and getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # the KV cache is incompatible with checkpointing during training
    return model


__all__ = [
    "default_compute_dtype",
    "guard_bnb_cpu",
    "is_linear4bit",
    "load_base_model",
    "make_bnb_config",
    "require_bitsandbytes",
]
