"""FSDP2 (`torch.distributed.fsdp.fully_shard`): adapter tensors and AdamW moments as DTensors sharded across processes.

Owns everything FlexLoRA does differently when its parameters are sharded. Under FSDP2 each adapter parameter at rest
is a DTensor sharded on dim 0, and so are the AdamW moments: for `P` (out, R) that splits the output dimension, for
`lam` (R,) and `Q` (R, in) it splits the *slot* dimension, so one process holds slots [0, R/2), the other the rest.
An event needs whole directions (importance reads the full λ; pruning looks for the smallest |λ| anywhere; a slot
move may carry a row of Q and its moments from one process's shard into another's). Chosen: gather, edit, scatter.
`gathered` swaps full copies of the touched layers' tensors (and their optimizer moments) in for the duration of an
event or a save, every process applies the same plan to identical full copies (process 0's plan, `events.py`; the
new directions come from a generator seeded by step, the same everywhere), and each process writes its own shard
back. Events are rare and adapters small, so the all-gathers cost little; nothing changes between events.

Eq. 2 needs whole P and Q with gradients that FSDP reduces like every other gradient, so under FSDP2 each layer
computes its term inside its forward, where FSDP has just unsharded the parameters (`FlexLoRALayer.orth_in_forward`),
and `FlexLoRAModel.orth_reg` averages those terms. The per-direction Adam correction (`slot_age.py`) acts on each
process's local shard (`local_slots`).

Every function here is a collective when its tensors are sharded: call it on every process, in the same order.
Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

ADAPTER_PARAMS = ("lora_P", "lora_lam", "lora_Q")


def _dtensor_class() -> type | None:
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed support
            DTensor = None  # type: ignore[assignment,misc]  # noqa: N806
        _DTENSOR = DTensor
    return _DTENSOR  # type: ignore[return-value]


_DTENSOR: Any = False  # resolved on first use (checked at every training forward: keep it a dict-free lookup)


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (FSDP2 / tensor-parallel sharded); False when torch lacks DTensor support."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: `t` itself, or the all-gathered value of a DTensor (a collective)."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def is_sharded(layer: nn.Module) -> bool:
    """Whether the layer's adapter parameters are sharded DTensors right now (FSDP2 at rest)."""
    return any(is_dtensor(layer._parameters.get(name)) for name in ADAPTER_PARAMS)


def refuse_if_sharded(layer: nn.Module, what: str) -> None:
    """Raise if `layer` is sharded: new slots would replace the parameters FSDP2 manages."""
    if is_sharded(layer):
        raise RuntimeError(
            f"{what}, but the layer is already sharded by fully_shard. Set FlexLoRAConfig.total_steps (or call "
            "model.finalize_capacity(total_steps)) before fully_shard, which then shards the final slots."
        )


def uses_fsdp2(model: nn.Module, layers: Iterable[nn.Module]) -> bool:
    """Whether `model` runs under FSDP2: it, its base model or any adapter layer is managed by `fully_shard`.

    Checked at each forward, cheaply: the root's class (`fully_shard` subclasses it) and the layers' parameter types
    (a block sharded on its own is still sharded when the root's forward starts).
    """
    fsdp_module: Any = None
    try:
        from torch.distributed.fsdp import FSDPModule  # public from torch 2.6 (FSDP2 needs it; README)

        fsdp_module = FSDPModule
    except ImportError:
        pass
    base = getattr(model, "base_model", None)
    if fsdp_module is not None and (isinstance(model, fsdp_module) or isinstance(base, fsdp_module)):
        return True
    return any(is_dtensor(layer._parameters.get("lora_lam")) for layer in layers)


def sync_orth_mode(model: Any) -> None:
    """At a training forward of a `FlexLoRAModel`: switch its layers to computing eq. 2 in their forward when it
    runs under FSDP2 (and back), so `fully_shard` may be applied at any time before training."""
    if not (model.training and torch.is_grad_enabled()):
        return
    layers = [layer for _, layer in model.flexlora_layers()]
    fsdp = uses_fsdp2(model, layers) and model.flexlora_config.orth_reg_weight > 0
    if fsdp or fsdp != model._orth_in_forward:
        model._orth_in_forward = fsdp
        for layer in layers:
            layer.orth_in_forward = fsdp
            layer.orth_term = None  # a term from an earlier forward (or a checkpoint recompute) is never reused


def orth_terms(named_layers: Iterable[tuple[str, Any]]) -> list[torch.Tensor]:
    """Eq. 2 of each layer: computed now, or (FSDP2) the term its forward computed this step, used once.

    Under FSDP2 a layer that did not run in this forward (an MoE expert without tokens) has no term; the processes
    agree on that (one small all-reduce) and all raise, instead of one raising while the others wait in backward.
    """
    named = list(named_layers)
    terms: list[torch.Tensor | None] = []
    for _, layer in named:
        if layer.orth_in_forward:
            term, layer.orth_term = layer.orth_term, None
            terms.append(term)
        else:
            terms.append(layer.orth_reg())
    if any(layer.orth_in_forward for _, layer in named):
        missing = torch.tensor([t is None for t in terms], dtype=torch.int32)  # (M,)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            missing = missing.to(device)
            dist.all_reduce(missing)
        if bool(missing.any()):
            name = named[int(missing.nonzero()[0])][0]
            raise RuntimeError(
                f"FlexLoRA under FSDP2: no eq. 2 term from the forward of {name} (on at least one process). Call "
                "model.orth_reg() once after each training forward (model.train(), gradients enabled), before its "
                "backward; with gradient checkpointing use use_reentrant=False. An adapted layer that does not run in "
                "every forward (MoE experts) is not supported under FSDP2 with orth_reg_weight > 0: set "
                "orth_reg_weight=0 or leave the experts out of target_modules."
            )
    return terms  # type: ignore[return-value]


def shard_bounds(t: Any) -> list[tuple[int, int]]:
    """(offset, length) of this process's shard along every dimension of DTensor `t` (all of it for a plain tensor).

    Follows DTensor's `Shard` layout (torch.chunk: ceil(n / world) per process, the last ones shorter or empty),
    nested over the mesh dimensions (HSDP meshes too). Other placements than Shard / Replicate are refused.
    """
    bounds = [(0, int(n)) for n in t.shape]
    if not is_dtensor(t):
        return bounds
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(
                f"FlexLoRA supports DTensor placements Shard and Replicate (FSDP2 / HSDP); got {placement}. Use "
                "fully_shard's default sharding for the adapter parameters."
            )
        d = placement.dim
        offset, length = bounds[d]
        world, coord = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        chunk = math.ceil(length / world) if length else 0
        start = min(coord * chunk, length)
        bounds[d] = (offset + start, max(0, min(chunk, length - start)))
    local = t.to_local()
    if tuple(n for _, n in bounds) != tuple(local.shape):  # never guess: a layout we do not understand is refused
        raise NotImplementedError(
            f"FlexLoRA could not place the local shard {tuple(local.shape)} of a {tuple(t.shape)} DTensor with "
            f"placements {t.placements}."
        )
    return bounds


def local_shard(full: torch.Tensor, like: Any) -> torch.Tensor:
    """This process's shard of `full`, laid out like the DTensor `like` (a view; `full` itself for a plain tensor)."""
    out = full
    for d, (offset, length) in enumerate(shard_bounds(like)):
        out = out.narrow(d, offset, length)
    return out


@torch.no_grad()
def write_shard(dst: Any, full: torch.Tensor) -> None:
    """Copy this process's shard of `full` into `dst` (a DTensor, or a plain tensor that takes all of it)."""
    local = dst.to_local() if is_dtensor(dst) else dst
    local.copy_(local_shard(full, dst).to(local.dtype))


def local_slots(param: Any, dim: int, slots: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Where the given slots of `param` (slot dimension `dim`) live on this process.

    Returns:
        `(local, positions, local_idx)`: the local tensor (the parameter itself, or its shard), the positions in
        `slots` of the slots this process holds, and their indices in `local`.
    """
    if not is_dtensor(param):
        return param, list(range(len(slots))), list(slots)
    offset, length = shard_bounds(param)[dim]
    positions = [i for i, s in enumerate(slots) if offset <= s < offset + length]
    return param.to_local(), positions, [slots[i] - offset for i in positions]


@contextmanager
def gathered(
    layers: Iterable[nn.Module], optimizer: Any = None, extra_modules: Iterable[nn.Module] = ()
) -> Iterator[None]:
    """Within the block, each sharded layer holds full (unsharded, plain) copies of P, λ and Q, and the optimizer
    holds full copies of their moments under those copies; on exit every process writes its shard back.
    `extra_modules` (e.g. `modules_to_save` for a save) get full copies of all their sharded parameters too.

    Layers whose parameters are plain tensors are left alone, so this is a no-op without FSDP2. Within the block do
    only what every process does identically (an event with process 0's plan, a save): the shards written back
    must agree. The per-tensor step counters stay shared objects (they are not sharded). Every placement is checked
    before anything is swapped, so the write-back cannot fail half-way on a layout we do not support.
    """
    from ..optim.surgery import unwrap_optimizer

    opt = unwrap_optimizer(optimizer) if optimizer is not None else None
    targets = [(layer, name) for layer in layers for name in ADAPTER_PARAMS]
    targets += [(sub, name) for m in extra_modules for sub in m.modules() for name in list(sub._parameters)]
    targets = [(m, n) for m, n in targets if is_dtensor(m._parameters.get(n))]
    for m, n in targets:  # validate every layout first (raises NotImplementedError before any swap)
        param: Any = m._parameters[n]
        shard_bounds(param)
        for v in (opt.state.get(param, {}) if opt is not None else {}).values():
            if is_dtensor(v):
                shard_bounds(v)
    swaps: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    try:
        for module, name in targets:
            p: Any = module._parameters[name]
            fp = nn.Parameter(full_tensor(p.detach()).clone(), requires_grad=p.requires_grad)
            state = opt.state.get(p) if opt is not None else None
            if state:
                opt.state[fp] = {k: full_tensor(v).clone() if is_dtensor(v) else v for k, v in state.items()}  # type: ignore[union-attr]
            module._parameters[name] = fp
            swaps.append((module, name, p, fp))
        yield
    finally:
        for module, name, p, fp in swaps:
            try:
                write_shard(p, fp.detach())
                state = opt.state.pop(fp, None) if opt is not None else None
                if state:
                    for k, v in state.items():
                        if is_dtensor(opt.state[p].get(k)):  # type: ignore[union-attr]
                            write_shard(opt.state[p][k], v)  # type: ignore[union-attr]
            finally:
                module._parameters[name] = p  # the sharded parameter always comes back
