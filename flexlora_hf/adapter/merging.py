"""Merging ΔW into the base layer's weight, and the refusal to merge into a quantised base.

Used by `FlexLoRAModel.merge_and_unload`; the adapter tensors are read, never changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import FlexLoRALayer, is_linear4bit


def check_mergeable(layer: FlexLoRALayer) -> None:
    """Raise `ValueError` if ΔW cannot be merged exactly into the base layer (bitsandbytes-quantised base)."""
    base: Any = layer.base_layer
    kind = type(base).__name__
    if is_linear4bit(base) or kind == "Linear8bitLt":
        raise ValueError(
            f"Refusing to merge FlexLoRA into a bitsandbytes-quantised {kind} base layer: re-quantising W + ΔW "
            "rounds most of ΔW away (an update of std 1e-3 on NF4 weights of std 0.02 keeps ~30% of its "
            "effect), so the merged model would silently lose the fine-tuning. Either keep the adapter unmerged "
            "(inference on the quantised base matches training), or load the base in full precision "
            "(`flexlora_hf.adapter.quantization.load_base_model(path, load_in_4bit=False)` or `from_pretrained(path, "
            "dtype=torch.bfloat16)`), load the adapter with `FlexLoRAModel.from_pretrained(base, adapter_dir)` "
            "and call `merge_and_unload()` there."
        )

@torch.no_grad()
def merged_base_layer(layer: FlexLoRALayer) -> nn.Module:
    """The base layer with ΔW added to its weight (adapter untouched). `ValueError` on a bitsandbytes base."""
    check_mergeable(layer)
    base: Any = layer.base_layer
    delta = layer.delta_weight()  # (out, in)
    w = base.weight
    if layer.fan_in_fan_out:
        w.data += delta.T.to(w.device, w.dtype)  # Conv1D stores (in, out)
    else:
        w.data += delta.to(w.device, w.dtype)
    return base
