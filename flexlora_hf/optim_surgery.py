"""In-place optimizer state surgery for a reallocation event.

Owns the one thing the authors' code gets most wrong: it rebuilt the optimizer from a state dict keyed by the wrong
ids, losing every AdamW moment, collapsing the weight-decay groups and leaving the LR scheduler on a dead optimizer.
Here the optimizer object, its param groups and the scheduler are never touched: parameters keep their shapes (slot
masking), and only the state *slices* of slots that were pruned or newly activated are zeroed, in place, so every
other moment is bit-identical before and after an event.

What a reset slice does to Adam's bias correction: torch's AdamW (and bitsandbytes' 32-bit optimizers) keep one step
counter per parameter *tensor*, not per slice, and we leave it alone. A reset slice therefore starts with m = v = 0
but with the tensor's large step count, i.e. without bias correction: its first update has magnitude about
(1-β1)/sqrt(1-β2) ≈ 3.2 (default betas) times lr, instead of 1 x lr, relaxing to the usual size as v fills
(~1/(1-β2) steps). For zero-impact directions only λ has a gradient at first (∂L/∂P and ∂L/∂Q are proportional to λ
= 0), so the effect is a brisk start of the new λ. The alternative, resetting the shared step counter, would disturb
every other slice of the tensor; the authors' full state loss is strictly worse.

Supported: torch AdamW/Adam (single-tensor, foreach and fused), SGD with momentum, and any optimizer whose per-param
state tensors have the parameter's shape and a float dtype (bitsandbytes 32-bit and paged 32-bit AdamW). Refused with
a clear error: block-quantised 8-bit states (bitsandbytes 8-bit/paged 8-bit AdamW: zeroing a slice of quantised codes
is not zeroing the moment) and factored states (Adafactor).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .layer import FlexLoRALayer


class UnsupportedOptimizerError(ValueError):
    """Raised when an optimizer keeps state FlexLoRA cannot reset per direction."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer (accelerate's `AcceleratedOptimizer` and friends expose `.optimizer`)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 5:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _slot_views(layer: FlexLoRALayer, slots: list[int]) -> list[tuple[torch.nn.Parameter, int]]:
    # (parameter, slot dimension): P (out, R) -> dim 1; lam (R,) and Q (R, in) -> dim 0.
    return [(layer.lora_P, 1), (layer.lora_lam, 0), (layer.lora_Q, 0)]


def check_optimizer_supported(optimizer: Any) -> None:
    """Fail early (at train start) for optimizers whose state cannot be reset per slot."""
    opt = unwrap_optimizer(optimizer)
    name = type(opt).__name__
    bits = getattr(getattr(opt, "args", None), "optim_bits", None)  # bitsandbytes keeps its settings in `.args`
    if "8bit" in name or bits == 8 or getattr(opt, "optim_bits", 32) == 8 or _group_flag(opt, "optim_bits") == 8:
        raise UnsupportedOptimizerError(
            f"FlexLoRA cannot reset the block-quantised 8-bit state of {name} per direction. Use optim='adamw_torch' "
            "(or 'paged_adamw_32bit'), which FlexLoRA supports."
        )
    if name in ("Adafactor",):
        raise UnsupportedOptimizerError(
            f"{name} keeps factored second moments that cannot be reset per direction; use optim='adamw_torch'."
        )


def _group_flag(opt: torch.optim.Optimizer, key: str) -> Any:
    for group in getattr(opt, "param_groups", []):
        if key in group:
            return group[key]
    return None


@torch.no_grad()
def reset_slots(optimizer: Any, touched: Iterable[tuple[FlexLoRALayer, list[int]]]) -> int:
    """Zero, in place, the optimizer state of the given slots of each layer. Returns the number of slices reset.

    Args:
        optimizer: a torch optimizer or a wrapper exposing `.optimizer`.
        touched: `(layer, slots)` pairs from `FlexLoRAModel.apply_plan`.

    Raises:
        UnsupportedOptimizerError: a state tensor is quantised or not shaped like its parameter.
    """
    opt = unwrap_optimizer(optimizer)
    n = 0
    for layer, slots in touched:
        idx = torch.as_tensor(sorted(set(slots)), dtype=torch.long)
        for param, dim in _slot_views(layer, slots):
            state = opt.state.get(param)
            if not state:
                continue  # no step taken yet for this tensor: nothing to reset
            for key, value in state.items():
                if not torch.is_tensor(value) or value.dim() == 0:
                    continue  # step counters and scalars are per tensor; see the module docstring
                if value.shape != param.shape or not value.is_floating_point():
                    raise UnsupportedOptimizerError(
                        f"Optimizer state {key!r} of {type(opt).__name__} has shape {tuple(value.shape)} and dtype "
                        f"{value.dtype} for a parameter of shape {tuple(param.shape)}: FlexLoRA cannot reset it per "
                        "direction. Use optim='adamw_torch'."
                    )
                value.index_fill_(dim, idx.to(value.device), 0.0)
                n += 1
    return n
