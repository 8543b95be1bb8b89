"""Per-direction Adam bias correction for directions that start mid-training (the reference code has none).

Why: torch's AdamW keeps one step counter per parameter *tensor*. A direction activated at step t_e gets zeroed
moments (`optim.surgery.reset_slots`) but inherits the tensor's large counter, so Adam applies no bias correction to
it: under a constant gradient its k-th update is (1 - β1^k) / sqrt(1 - β2^k) x lr, i.e. 3.2x lr at k = 1, 6.6x at
k = 12 and still 2x at k = 300 (default betas). A fresh Adam would take 1x lr steps.

What: optimizer step hooks (`register_step_pre_hook` / `register_step_post_hook`, so the Trainer, accelerate and
plain loops are all covered) rescale the update of each young slot slice by

    c(k, t) = [sqrt(1 - β2^k) / (1 - β1^k)] / [sqrt(1 - β2^t) / (1 - β1^t)]

where k is the slot's own age in optimizer steps and t the tensor's step count: the slot then moves exactly as under
a fresh Adam (up to ε), and every other slice is untouched. A slot is dropped once |c - 1| < `tol`. Decoupled weight
decay is scaled with the update (λ has none; P and Q rarely do). Each layer owns its slots' birth steps
(`FlexLoRALayer.slot_birth`, saved with the adapter so resume is exact); ages are counted on the host, so the hooks
never synchronise with the device. Under FSDP2 each process corrects the young slots of its own shard. Cost: two
small gathers and one scatter per young slot tensor per step, and only while some direction is young.

Optimizers without Adam's `betas` (SGD) get no hooks: their steps do not depend on a step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..adapter.layer import FlexLoRALayer
from ..distributed.sharding import is_dtensor, local_slots
from .surgery import unwrap_optimizer


def _local(param: Any) -> torch.Tensor:
    """The tensor a step updates in place: the parameter's data, or its local shard under FSDP2."""
    return param.to_local() if is_dtensor(param) else param.data

_ATTR = "_flexlora_slot_age"


def correction(k: int, t: int, beta1: float, beta2: float) -> float:
    """c(k, t): the factor that turns a tensor-level Adam update at tensor step t into a fresh-Adam update at age k."""
    fresh = math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k)
    shared = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    return fresh / shared


class SlotAgeCorrection:
    """The two step hooks of one optimizer that correct the updates of young slots (`FlexLoRALayer.slot_birth`).

    Use [`SlotAgeCorrection.attach`]; `FlexLoRAModel.apply_plan` calls it at every event, the Trainer callback at
    train start (resume: births are saved with the adapter).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, step: int, layers: Iterable[FlexLoRALayer], tol: float
    ) -> None:
        self.optimizer = optimizer
        self.step = int(step)  # optimizer steps completed (host counter: the hooks never read device state)
        self.layers = list(layers)
        self.tol = tol
        self._betas: dict[int, tuple[float, float]] = {
            id(p): (float(g["betas"][0]), float(g["betas"][1])) for g in optimizer.param_groups for p in g["params"]
        }
        self._before: list[tuple[FlexLoRALayer, list[tuple[nn.Parameter, int, torch.Tensor]]]] = []
        self._cache: dict[tuple[int, int, tuple[tuple[int, int], ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    @classmethod
    def attach(
        cls, optimizer: Any, step: int, layers: Iterable[FlexLoRALayer], tol: float = 1e-3
    ) -> SlotAgeCorrection | None:
        """The correction of `optimizer` (created on first use, re-synchronised to `step` after), or `None` for
        optimizers without Adam's betas."""
        opt = unwrap_optimizer(optimizer)
        if not all("betas" in g for g in opt.param_groups):
            return None
        existing: SlotAgeCorrection | None = getattr(opt, _ATTR, None)
        if existing is not None:
            existing.step = int(step)
            existing.layers = list(layers)
            return existing
        corr = cls(opt, step, layers, tol)
        setattr(opt, _ATTR, corr)
        return corr

    def __len__(self) -> int:
        """Number of young directions being corrected."""
        return sum(len(layer.slot_birth) for layer in self.layers)

    # ------------------------------------------------------------------ hooks
    def _young(self, layer: FlexLoRALayer, param: Any, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index tensor, birth-step tensor) of the young slots of `layer` that this process holds in `param`
        (all of them, or those of its FSDP2 shard), on the parameter's device; rebuilt only when the young set
        changes, so a step copies nothing from the host."""
        key = (id(layer), id(param), tuple(sorted(layer.slot_birth.items())))
        if key not in self._cache:
            slots = sorted(layer.slot_birth)
            _, positions, local_idx = local_slots(param, dim, slots)
            births = [float(layer.slot_birth[slots[i]]) for i in positions]
            device = param.device
            self._cache[key] = (torch.tensor(local_idx, device=device), torch.tensor(births, device=device))
            if len(self._cache) > 12 * len(self.layers) + 16:  # stale entries of earlier young sets
                self._cache = {k: v for k, v in self._cache.items() if k[2] == key[2] or k[0] != key[0]}
        return self._cache[key]

    @torch.no_grad()
    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._before = []
        for layer in self.layers:
            if not layer.slot_birth:
                continue
            snaps = []
            for param, dim in ((layer.lora_P, 1), (layer.lora_lam, 0), (layer.lora_Q, 0)):
                if id(param) in self._betas:
                    idx, _ = self._young(layer, param, dim)
                    if idx.numel():  # young slices before the step (of this process's shard under FSDP2)
                        snaps.append((param, dim, _local(param).index_select(dim, idx)))
            self._before.append((layer, snaps))

    @torch.no_grad()
    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step += 1
        t = float(self.step)
        for layer, snaps in self._before:
            for param, dim, before in snaps:
                beta1, beta2 = self._betas[id(param)]
                idx, births = self._young(layer, param, dim)
                k = t - births  # (n,) each slot's age, on the device
                fresh = torch.sqrt(1.0 - torch.pow(beta2, k)) / (1.0 - torch.pow(beta1, k))
                c = fresh / (math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))  # (n,) correction(k, t)
                shape = [1] * param.dim()
                shape[dim] = int(idx.numel())
                local = _local(param)
                after = local.index_select(dim, idx)
                local.index_copy_(dim, idx, before + c.to(local.dtype).view(shape) * (after - before))
            beta1, beta2 = self._betas.get(id(layer.lora_lam), (0.9, 0.999))
            for s in sorted(layer.slot_birth):  # old enough (host arithmetic): fresh and shared Adam now agree
                if abs(correction(self.step - layer.slot_birth[s], self.step, beta1, beta2) - 1.0) < self.tol:
                    del layer.slot_birth[s]
        self._before = []

    def remove(self) -> None:
        """Unregister the hooks (the optimizer then behaves like plain Adam again)."""
        for handle in self._handles:
            handle.remove()
        if getattr(self.optimizer, _ATTR, None) is self:
            delattr(self.optimizer, _ATTR)
