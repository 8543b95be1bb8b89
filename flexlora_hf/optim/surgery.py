"""The optimizer side of FlexLoRA: λ's param group, and in-place state surgery for a reallocation event.

Owns the one thing the authors' code gets most wrong: it rebuilt the optimizer from a state dict keyed by the wrong
ids, losing every AdamW moment, collapsing the weight-decay groups and leaving the LR scheduler on a dead optimizer.
Here the optimizer object, its param groups and the scheduler are never touched: parameters keep their shapes (slot
masking), and only the state *slices* of slots that were pruned or newly activated are zeroed, in place, so every
other moment is bit-identical before and after an event.

What a reset slice does to Adam's bias correction: torch's AdamW (and bitsandbytes' 32-bit optimizers) keep one step
counter per parameter *tensor*, not per slice, and we leave it alone (resetting it would disturb every other slice).
A reset slice therefore starts with m = v = 0 but with the tensor's large step count, i.e. without bias correction:
its updates would be up to ~3-7x lr for hundreds of steps, so each new direction is bias-corrected by its own age
(`slot_age.py`; the reference code leaves it).

λ's param group: λ trains at the optimizer's rate (the paper's single rate) but never with weight decay (a decayed λ
would shrink ΔW's singular values towards 0, which eq. 3 would read as a spectrum). [`param_groups`] builds the
groups for a custom loop; `FlexLoRATrainer` keeps λ out of its decay group.

Supported: torch AdamW/Adam (single-tensor, foreach and fused), SGD with momentum, and any optimizer whose per-param
state tensors have the parameter's shape and a float dtype (bitsandbytes 32-bit and paged 32-bit AdamW). Refused with
a clear error: block-quantised 8-bit states (bitsandbytes 8-bit/paged 8-bit AdamW: zeroing a slice of quantised codes
is not zeroing the moment) and factored states (Adafactor).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..adapter.layer import FlexLoRALayer

LAMBDA_PARAM = "lora_lam"


class UnsupportedOptimizerError(ValueError):
    """Raised when an optimizer keeps state FlexLoRA cannot reset per direction."""


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer (accelerate's `AcceleratedOptimizer` and friends expose `.optimizer`)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 5:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def lambda_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable λ vectors of every adapted matrix, in model order."""
    return [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] == LAMBDA_PARAM]


def lambda_groups(model: nn.Module, lr: float) -> list[dict]:
    """λ's param group (no weight decay, rate `lr`), empty if the model has no trainable λ."""
    lam = lambda_parameters(model)
    return [{"params": lam, "weight_decay": 0.0, "lr": lr}] if lam else []


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer param groups for a custom loop: decayed weights (P and Q among them), undecayed biases and norms,
    and λ's undecayed group ([`lambda_groups`]). The same rules as `FlexLoRATrainer`'s optimizer."""
    lam_groups = lambda_groups(model, lr)
    lam = {id(p) for g in lam_groups for p in g["params"]}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in lam:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups + lam_groups if g["params"]]


def _slot_views(layer: FlexLoRALayer) -> list[tuple[torch.nn.Parameter, int]]:
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


class StaleOptimizerError(ValueError):
    """Raised when an optimizer does not hold the model's trainable adapter tensors (they would never train)."""


def check_optimizer_holds_adapter(optimizer: Any, layers: Iterable[tuple[str, FlexLoRALayer]]) -> None:
    """Raise `StaleOptimizerError` unless `optimizer` holds every trainable P, λ and Q of `layers`.

    An optimizer built before the adapter's Parameters were replaced (slot capacity grown by `finalize_capacity`, or
    an adapter of another capacity loaded) holds the old tensors: its steps update nothing the model uses, and
    nothing else would say so. The Trainer calls this at train start; custom loops may call it after building theirs.

    Args:
        optimizer: a torch optimizer or a wrapper exposing `.optimizer` (accelerate's).
        layers: `(module path, layer)` pairs, e.g. `model.flexlora_layers()`.
    """
    held = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    names = ("lora_P", "lora_lam", "lora_Q")
    missing = [
        f"{path}.{attr}"
        for path, layer in layers
        for attr in names
        if getattr(layer, attr).requires_grad and id(getattr(layer, attr)) not in held
    ]
    if missing:
        raise StaleOptimizerError(
            f"The optimizer ({type(unwrap_optimizer(optimizer)).__name__}) does not hold {len(missing)} trainable "
            f"FlexLoRA adapter tensors (e.g. {missing[0]!r}), so training would never update them. It was built before "
            "the adapter's Parameters were replaced: get_flexlora_model without total_steps grows the rank slots when "
            "training starts, and loading an adapter of another capacity replaces them too. Fix: set "
            "FlexLoRAConfig(total_steps=...) or call model.finalize_capacity(total_steps) (and load any adapter) "
            "before building the optimizer, or let the Trainer build it (drop optimizers=(...))."
        )


def _group_flag(opt: torch.optim.Optimizer, key: str) -> Any:
    for group in getattr(opt, "param_groups", []):
        if key in group:
            return group[key]
    return None


def _slot_states(opt: torch.optim.Optimizer, layer: FlexLoRALayer) -> list[tuple[torch.Tensor, int, str]]:
    """(state tensor, slot dimension, key) for every per-element optimizer state of the layer's P, λ and Q."""
    out = []
    for param, dim in _slot_views(layer):
        state = opt.state.get(param)
        if not state:
            continue  # no step taken yet for this tensor: nothing to reset
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue  # step counters and scalars are per tensor; see the module docstring
            if type(value) is not torch.Tensor or value.shape != param.shape or not value.is_floating_point():
                raise UnsupportedOptimizerError(
                    f"Optimizer state {key!r} of {type(opt).__name__} has shape {tuple(value.shape)} and dtype "
                    f"{value.dtype} for a parameter of shape {tuple(param.shape)}: FlexLoRA cannot reset it per "
                    "direction. Use optim='adamw_torch'."
                )
            out.append((value, dim, key))
    return out


def check_state_layout(optimizer: Any, layers: Iterable[FlexLoRALayer]) -> None:
    """Raise `UnsupportedOptimizerError` unless every per-element state of the adapters is a plain float tensor
    shaped like its parameter (what per-direction resets and moves need). Call it after the first step."""
    opt = unwrap_optimizer(optimizer)
    for layer in layers:
        _slot_states(opt, layer)


@torch.no_grad()
def reset_slots(optimizer: Any, touched: Iterable[tuple[FlexLoRALayer, list[int]]]) -> int:
    """Zero, in place, the optimizer state of the given slots of each layer. Returns the number of slices reset.

    Args:
        optimizer: a torch optimizer or a wrapper exposing `.optimizer`.
        touched: `(layer, slots)` pairs.

    Raises:
        UnsupportedOptimizerError: a state tensor is quantised or not shaped like its parameter.
    """
    opt = unwrap_optimizer(optimizer)
    n = 0
    for layer, slots in touched:
        idx = torch.as_tensor(sorted(set(slots)), dtype=torch.long)
        for value, dim, _ in _slot_states(opt, layer):
            value.index_fill_(dim, idx.to(value.device), 0.0)
            n += 1
    return n


@torch.no_grad()
def move_slots(optimizer: Any, moves: Iterable[tuple[FlexLoRALayer, int, int]]) -> None:
    """Move the optimizer state of slot `src` to `dst` and zero `src`, for each `(layer, src, dst)`.

    The state follows its direction when pruning packs the active slots into a prefix (`FlexLoRALayer.prune_smallest`),
    so a moved direction keeps its moments exactly.
    """
    opt = unwrap_optimizer(optimizer)
    for layer, src, dst in moves:
        for value, dim, _ in _slot_states(opt, layer):
            value.select(dim, dst).copy_(value.select(dim, src))
            value.select(dim, src).zero_()
