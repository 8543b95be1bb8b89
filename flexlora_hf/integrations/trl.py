"""TRL integration: `FlexLoRASFTTrainer`, TRL's `SFTTrainer` with FlexLoRA rank reallocation.

This module owns what it takes for a `FlexLoRAModel` to go through `trl.SFTTrainer` (dataset preparation, chat
templates, completion-only loss, its fused LM-head loss and metrics) unchanged. The FlexLoRA side (wrapping,
events, the orthogonality term, adapter checkpoints, resume) is `FlexLoRATrainerMixin`, exactly as in
`FlexLoRATrainer`. It imports `trl` (``pip install flexlora_hf[trl]``); ``import flexlora_hf`` does not.

What `SFTTrainer.__init__` (trl 1.16) does to the model it is given, and what this class does about it:

* ``peft_config=``: SFTTrainer would wrap the model with PEFT's `get_peft_model`, a second adapter whose ranks never
  move. Refused with a `ValueError` naming the fix, as is a `PeftModel` passed as the model.
* a model id string: SFTTrainer loads it with ``args.model_init_kwargs`` (and ``quantization_config``); the same
  loader (`trl.trainer.utils.create_model_from_path`) runs here first, so the model is wrapped before SFTTrainer
  sees it.
* the fused LM head: SFTTrainer patches ``forward`` of the model it holds (of ``get_base_model()`` for a
  `PeftModel` only) to compute per-token log-probabilities without the full logits. That patch reaches the backbone
  as ``model.base_model``, which on a `FlexLoRAModel` is the whole causal LM, so the patch is moved onto the wrapped
  transformers model, where TRL puts it under PEFT; the FlexLoRA wrapper passes ``fused_lm_head=True`` through.
* a 4-bit / 8-bit base: SFTTrainer casts every trainable parameter to bf16 (its QLoRA recipe, written for PEFT's
  LoRA A and B). FlexLoRA's adapter keeps the dtype it was built in (fp32 by default, see `layer.py`): λ is a
  per-direction scale, like DoRA's magnitude vector, which TRL exempts from the cast because bf16 cannot represent
  its small updates, and every event ranks directions by small differences of importance. The original tensors are
  put back (no fp32 -> bf16 -> fp32 round trip).

Gradient checkpointing (SFTConfig's default) needs nothing here: transformers enables input gradients for
``input_ids`` models when it switches checkpointing on.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model

try:  # helpers of trl 1.x that are not public API: tested with trl 1.16
    from trl.trainer.utils import add_fused_lm_head, create_model_from_path
except ImportError:  # pragma: no cover - a trl without them neither patches forward nor loads ids this way
    add_fused_lm_head = create_model_from_path = None  # type: ignore[assignment]

from ..adapter.model import FlexLoRAModel, get_flexlora_model
from ..config import FlexLoRAConfig
from .trainer import FlexLoRATrainerMixin

logger = logging.getLogger(__name__)

# The per-token fields SFTTrainer.compute_loss reads from the fused head (trl 1.16); only used when the patch TRL
# installed cannot be read (see `_move_fused_lm_head`).
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")

_PEFT_CONFIG_REFUSAL = (
    "FlexLoRASFTTrainer got SFTTrainer's peft_config together with FlexLoRA: SFTTrainer would wrap the model with "
    "PEFT's get_peft_model, a second adapter whose ranks never move. Remove peft_config= and describe the adapter in "
    "flexlora_config=FlexLoRAConfig(r=..., lora_alpha=..., target_modules=..., modules_to_save=...) (the same field "
    "names as LoraConfig), or use trl.SFTTrainer to train a plain LoRA."
)


def _sft_parameters(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """SFTTrainer's arguments, positional or keyword, as one keyword dict (unknown names raise `TypeError`)."""
    bound = inspect.signature(trl.SFTTrainer.__init__).bind_partial(None, *args, **kwargs)
    params = dict(bound.arguments)
    params.pop(next(iter(params)))  # `self`
    return params


def _move_fused_lm_head(fm: FlexLoRAModel) -> bool:
    """Move the fused LM-head ``forward`` SFTTrainer put on the wrapper onto the wrapped transformers model.

    The patch is rebuilt with the arguments SFTTrainer chose, read from the patched function's closure (TRL passes
    ``temperature``, ``cast_lm_head_to_fp32`` and ``outputs``); `SFT_FUSED_OUTPUTS` stands in if they cannot be read.

    Returns:
        `bool`: whether a patch was found and moved.
    """
    patched = vars(fm).get("forward")
    if patched is None or add_fused_lm_head is None:
        return False
    del fm.forward  # back to the class's forward, which calls the base model with every keyword
    func = getattr(patched, "__func__", patched)
    code, closure = getattr(func, "__code__", None), getattr(func, "__closure__", None) or ()
    cells: dict[str, Any] = {}
    for name, cell in zip(code.co_freevars if code is not None else (), closure, strict=False):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    options: dict[str, Any] = {key: cells[key] for key in ("temperature", "cast_lm_head_to_fp32") if key in cells}
    options["outputs"] = tuple(cells.get("outputs", SFT_FUSED_OUTPUTS))
    add_fused_lm_head(fm.get_base_model(), **options)  # type: ignore[arg-type]  # a transformers causal LM
    return True


class FlexLoRASFTTrainer(FlexLoRATrainerMixin, trl.SFTTrainer):
    """TRL's `SFTTrainer` with FlexLoRA: swap `SFTTrainer` for `FlexLoRASFTTrainer` and pass `flexlora_config`.

    Accepts every `SFTTrainer` argument (``model`` may be a model id, loaded with ``args.model_init_kwargs`` and
    ``quantization_config`` as SFTTrainer does) plus ``flexlora_config``; SFTTrainer's dataset handling
    (language-modeling text, prompt/completion with completion-only loss, conversational ``messages`` through the
    tokenizer's chat template) is unchanged. Reallocation events, the orthogonality term, the logged
    ``flexlora/*`` metrics, adapter checkpoints and resume are those of `FlexLoRATrainer`.

    Args:
        *args, **kwargs: `trl.SFTTrainer`'s arguments.
        flexlora_config (`FlexLoRAConfig`, *optional*):
            Adapter shape and reallocation schedule; required unless ``model`` is already a `FlexLoRAModel`.

    Raises:
        ValueError: if ``peft_config`` is given (SFTTrainer would add a PEFT adapter next to FlexLoRA's), if the model
            is a `PeftModel`, or if a plain model comes without ``flexlora_config``.

    Example:

    ```python
    >>> from trl import SFTConfig
    >>> from flexlora_hf import FlexLoRAConfig, FlexLoRASFTTrainer
    >>> trainer = FlexLoRASFTTrainer(
    ...     model=model,  # or a model id; a 4-bit base from flexlora_hf.load_base_model(..., load_in_4bit=True)
    ...     args=SFTConfig(output_dir="out", max_steps=1000, learning_rate=2e-4),
    ...     train_dataset=dataset,  # "text", "prompt"/"completion" or "messages" columns
    ...     processing_class=tokenizer,
    ...     flexlora_config=FlexLoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
    ...                                    b0=4, t_warmup=200, t_final=200, delta_t=50),
    ... )
    >>> trainer.train()
    >>> trainer.save_model()  # the FlexLoRA adapter folder (native + PEFT view, rank map, card)
    ```
    """

    def __init__(self, *args: Any, flexlora_config: FlexLoRAConfig | None = None, **kwargs: Any) -> None:
        params = _sft_parameters(args, kwargs)
        if params.pop("peft_config", None) is not None:
            raise ValueError(_PEFT_CONFIG_REFUSAL)
        model = params.get("model")
        if isinstance(model, str):
            model = self._load_model(model, params)
        if model is None:
            raise ValueError("FlexLoRASFTTrainer needs a model (a model id, a transformers model or a FlexLoRAModel).")
        if is_peft_model(model):
            raise ValueError(
                "FlexLoRASFTTrainer got a PeftModel: FlexLoRA would wrap PEFT's adapter layers. Pass the base model "
                "(peft_model.merge_and_unload() to keep a trained LoRA merged in) with flexlora_config=..."
            )
        if not isinstance(model, FlexLoRAModel):
            if flexlora_config is None:
                raise ValueError(
                    "FlexLoRASFTTrainer got a plain model and no flexlora_config: pass "
                    "flexlora_config=FlexLoRAConfig(...) or a model wrapped with get_flexlora_model."
                )
            # Wrapped here rather than by the mixin, so the adapter's own tensors are known before SFTTrainer runs.
            model, flexlora_config = get_flexlora_model(model, flexlora_config), None
        params["model"] = model
        built = {name: p.data for name, p in model.named_parameters() if p.requires_grad}

        super().__init__(flexlora_config=flexlora_config, **params)

        fm = self.flexlora_model
        if _move_fused_lm_head(fm):
            logger.debug("FlexLoRASFTTrainer: SFTTrainer's fused LM head moved onto the wrapped model.")
        restored = 0
        for name, p in fm.named_parameters():
            original = built.get(name)
            if original is not None and p.dtype != original.dtype:
                p.data = original.to(p.device)  # the very tensor FlexLoRA built, not a bf16 round trip
                restored += 1
        if restored:
            logger.info(
                "FlexLoRASFTTrainer: kept %d trainable tensors in the dtype FlexLoRA built them in (SFTTrainer casts "
                "the adapter of a quantized base to bf16, where λ's small updates would be lost).",
                restored,
            )

    @staticmethod
    def _load_model(model_id: str, params: dict[str, Any]) -> torch.nn.Module:
        """Load ``model_id`` the way SFTTrainer does (``args.model_init_kwargs`` + ``quantization_config``)."""
        targs = params.get("args")
        init_kwargs = dict(getattr(targs, "model_init_kwargs", None) or {})
        quantization_config = params.pop("quantization_config", None)
        if quantization_config is not None:
            if "quantization_config" in init_kwargs:
                raise ValueError(
                    "quantization_config is set both as a trainer argument and in args.model_init_kwargs; set it once."
                )
            init_kwargs["quantization_config"] = quantization_config
        init_kwargs.setdefault("trust_remote_code", getattr(targs, "trust_remote_code", False))
        if targs is not None and getattr(targs, "model_init_kwargs", None) is not None:
            targs = copy.copy(targs)  # consumed here: SFTTrainer would warn that an instantiated model ignores them
            targs.model_init_kwargs = None
            params["args"] = targs
        if params.get("processing_class") is None and init_kwargs.get("revision") is not None:
            from transformers import AutoProcessor

            # SFTTrainer loads the processor from the model's config path, which forgets the revision asked for.
            params["processing_class"] = AutoProcessor.from_pretrained(
                model_id, revision=init_kwargs["revision"], trust_remote_code=init_kwargs["trust_remote_code"]
            )
        if create_model_from_path is None:  # pragma: no cover - depends on the installed trl
            raise ValueError(
                f"This trl ({trl.__version__}) has no create_model_from_path: load {model_id!r} yourself (e.g. "
                "flexlora_hf.load_base_model) and pass the model instance."
            )
        return create_model_from_path(model_id, **init_kwargs)


__all__ = ["SFT_FUSED_OUTPUTS", "FlexLoRASFTTrainer"]
