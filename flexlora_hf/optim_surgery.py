"""The optimizer side of FlexLoRA: λ's param group, and in-place state surgery for a reallocation event.

Owns the one thing the authors' code gets most wrong: it rebuilt the optimizer from a state dict keyed by the wrong
ids, losing every AdamW moment, collapsing the weight-decay groups and leaving the LR scheduler on a dead optimizer.
Here the optimizer object, its param groups and the scheduler are never touched: parameters keep their shapes (slot
masking), and only the state *slices* of slots that were pruned or newly activated are zeroed, in place, so every
other moment is bit-identical before and after an event.

What a reset slice does to Adam's bias correction: torch's AdamW (and bitsandbytes' 32-bit optimizers) keep one step
counter per parameter *tensor*, not per slice, and we leave it alone (resetting it would disturb every other slice).
A reset slice therefore starts with m = v = 0 but with the tensor's large step count, i.e. without bias correction:
its updates are up to ~3-7x lr for hundreds of steps. `adam_reset="slot_age"` (default) corrects each new direction
by its own age (`slot_age.py`); `"shared_step"` leaves it (the previous behaviour).

λ's param groups: λ gets its own learning rate (and never weight decay), as LoRA+ gives B its own. Under
`lam_lr_rule="lora_matched"` (default) λ's rate in a matrix with `out` output features is `lr * lam_lr_ratio *
sqrt(out / 3)`: one Adam step of λ_i then moves ΔW as far as one Adam step of a LoRA B column does (out entries of
±lr against a Kaiming-uniform A row of norm 1/sqrt(3)), so the adapter's speed per matrix follows LoRA's. Matrices
of equal `out` share a group. [`split_adapter_groups`] does it to an optimizer the Trainer built, [`param_groups`]
builds the groups for a custom loop.

P's and Q's rate (`basis_lr_ratio`, opt-in; default 1.0, the paper's single rate), as LoRA+ gives B its own: with
unit-norm directions a LoRA-sized ΔW lives in λ, and under Adam a direction turns by about lr * sqrt(d) per step
whatever λ is, while LoRA's A row (norm 1/sqrt(3)) turns sqrt(3) times faster at the same lr. Measured on the decoder
check, 2x moved which seeds learn late instead of removing the delay, so it is not the default (docs/benchmarks.md).

Supported: torch AdamW/Adam (single-tensor, foreach and fused), SGD with momentum, and any optimizer whose per-param
state tensors have the parameter's shape and a float dtype (bitsandbytes 32-bit and paged 32-bit AdamW). Refused with
a clear error: block-quantised 8-bit states (bitsandbytes 8-bit/paged 8-bit AdamW: zeroing a slice of quantised codes
is not zeroing the moment) and factored states (Adafactor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import LAM_LR_RULES
from .layer import FlexLoRALayer

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


def lam_lr_multiplier(out_features: int, lam_lr_ratio: float, lam_lr_rule: str) -> float:
    """λ's learning rate over the optimizer's for a matrix with `out_features` outputs (see the module docstring)."""
    if lam_lr_rule == "constant":
        return float(lam_lr_ratio)
    if lam_lr_rule == "lora_matched":
        # LoRA's B column step: sqrt(out) * |a_i| = 1/sqrt(3)
        return float(lam_lr_ratio) * math.sqrt(out_features / 3.0)
    raise ValueError(f"lam_lr_rule={lam_lr_rule!r} is not supported; choose one of {', '.join(LAM_LR_RULES)}.")


def lambda_groups(
    model: nn.Module, lr: float, lam_lr_ratio: float | None = None, lam_lr_rule: str | None = None
) -> list[dict]:
    """λ's param groups (no weight decay), one per distinct rate, in model order. `lam_lr_ratio` / `lam_lr_rule`
    default to the model's `flexlora_config` (or 1.0 / "constant" for a bare module)."""
    config = getattr(model, "flexlora_config", None)
    ratio = lam_lr_ratio if lam_lr_ratio is not None else getattr(config, "lam_lr_ratio", 1.0)
    rule = lam_lr_rule if lam_lr_rule is not None else getattr(config, "lam_lr_rule", "constant")
    by_rate: dict[float, list[nn.Parameter]] = {}
    for layer in model.modules():
        if isinstance(layer, FlexLoRALayer) and layer.lora_lam.requires_grad:
            by_rate.setdefault(lam_lr_multiplier(layer.out_features, ratio, rule), []).append(layer.lora_lam)
    return [{"params": ps, "weight_decay": 0.0, "lr": lr * m} for m, ps in by_rate.items()]


def basis_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable P and Q of every adapted matrix (the directions), in model order."""
    return [t for m in model.modules() if isinstance(m, FlexLoRALayer) for t in (m.lora_P, m.lora_Q) if t.requires_grad]


def _basis_ratio(model: nn.Module, basis_lr_ratio: float | None) -> float:
    config = getattr(model, "flexlora_config", None)
    return float(basis_lr_ratio if basis_lr_ratio is not None else getattr(config, "basis_lr_ratio", 1.0))


def needs_own_groups(config: Any) -> bool:
    """Whether a config asks for rates other than the optimizer's (then the Trainer splits its groups)."""
    return config.lam_lr_ratio != 1.0 or config.lam_lr_rule != "constant" or config.basis_lr_ratio != 1.0


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, lam_lr_ratio: float | None = None,
    lam_lr_rule: str | None = None, basis_lr_ratio: float | None = None,
) -> list[dict]:
    """Optimizer param groups for a custom loop: decayed weights, undecayed biases / norms, λ's groups
    ([`lambda_groups`]) and, when `basis_lr_ratio` != 1, P and Q at `lr * basis_lr_ratio` (decayed like any weight).
    Same rules as `FlexLoRATrainer`; unset arguments come from the model's `flexlora_config`."""
    lam_groups = lambda_groups(model, lr, lam_lr_ratio, lam_lr_rule)
    lam = {id(p) for g in lam_groups for p in g["params"]}
    basis_ratio = _basis_ratio(model, basis_lr_ratio)
    basis = {id(p) for p in basis_parameters(model)} if basis_ratio != 1.0 else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    directions: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in lam:
            if id(p) in basis:
                directions.append(p)
            else:
                (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"params": directions, "weight_decay": weight_decay, "lr": lr * basis_ratio},
    ]
    return [g for g in groups + lam_groups if g["params"]]


def split_adapter_groups(optimizer: Any, model: nn.Module, lr: float) -> None:
    """Give the adapter its own rates in an optimizer the Trainer built: every λ moves into λ's groups
    ([`lambda_groups`] at base rate `lr`, no weight decay), and with `basis_lr_ratio` != 1 the P and Q of each
    group move into a copy of that group (same weight decay) at `basis_lr_ratio` times its rate.

    Call it right after the optimizer is built, before the LR scheduler exists (schedulers record each group's
    initial rate, so the ratios are kept along the schedule). The group layout is the same on every run, so
    `optimizer.pt` resumes.
    """
    opt = unwrap_optimizer(optimizer)
    lam_groups = lambda_groups(model, lr)
    ids = {id(p) for g in lam_groups for p in g["params"]}
    if not ids or any(opt.state.get(p) for g in lam_groups for p in g["params"]):
        raise RuntimeError("split_adapter_groups: call it on a fresh optimizer (before any step) that holds λ.")
    basis_ratio = _basis_ratio(model, None)
    basis = {id(p) for p in basis_parameters(model)} if basis_ratio != 1.0 else set()
    basis_groups = []
    for group in opt.param_groups:
        moved = [p for p in group["params"] if id(p) in basis]
        group["params"] = [p for p in group["params"] if id(p) not in ids and id(p) not in basis]
        if moved:
            settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            basis_groups.append({**settings, "params": moved, "lr": group["lr"] * basis_ratio})
    for group in basis_groups + lam_groups:
        opt.add_param_group(group)


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
