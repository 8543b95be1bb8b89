"""`FlexLoRAModel` and `get_flexlora_model`: FlexLoRA layers injected into a transformers model.

Owns injection and freezing (which modules: `targets.py`), construction from a saved folder (`from_pretrained`,
reading and validation: `io/native.py`), the model-level views (`rank_map`, `importance_scores`, `orth_reg`),
`apply_plan` (the one seam where a pure `ReallocationPlan` meets the tensors) and `update_and_allocate` (one
scheduled event, PEFT AdaLoRA's custom-loop name; the event itself lives in `events.py`). Imports torch only at
module level; the I/O and Hub layers sit above and are imported where used.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..config import FlexLoRAConfig
from ..distributed.sharding import full_tensor, gathered, orth_terms, refuse_if_sharded, sync_orth_mode
from ..functional.allocation import ReallocationPlan
from ..functional.scoring import importance_batched
from ..optim.slot_age import SlotAgeCorrection
from ..optim.surgery import move_slots, reset_slots
from .events import update_and_allocate
from .layer import FlexLoRALayer, layer_shape
from .merging import check_mergeable, merged_base_layer
from .quantization import guard_bnb_cpu
from .targets import default_modules_to_save, find_target_modules, matches, resolve_capacity, set_module

logger = logging.getLogger(__name__)


def expansion_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the draws of the event at `step`: same seed on every process, independent of history."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


class FlexLoRAModel(nn.Module):
    """A transformers model with FlexLoRA adapters injected; behaves like the wrapped model.

    Attribute access falls through to the base model (`config`, `generate`, ...), and `forward` carries the base
    model's signature so `Trainer` keeps the right dataset columns. Build it with `get_flexlora_model`.
    """

    def __init__(self, model: nn.Module, config: FlexLoRAConfig) -> None:
        super().__init__()
        config = copy.deepcopy(config)  # the model owns its config (total_steps, caps are filled in later)
        if config.modules_to_save is None:
            config.modules_to_save = default_modules_to_save(model)
        self.base_model = model
        self.flexlora_config = config
        self.rank_history: list[dict[str, Any]] = []
        self.capacity_final = config.total_steps is not None or config.max_rank is not None
        self._hf_peft_config_loaded = True  # lets Trainer accept a quantized base that carries adapters

        for p in model.parameters():
            p.requires_grad_(False)
        guard_bnb_cpu(model)  # bitsandbytes 0.50 on CPU: an eval no-grad pass would silently zero 4-bit grads
        names = find_target_modules(model, config)
        gen = torch.Generator().manual_seed(config.seed)
        for name in names:
            base = model.get_submodule(name)
            d_in, d_out = layer_shape(base)
            layer = FlexLoRALayer(
                base,
                r=config.r,
                capacity=resolve_capacity(config, name, d_in, d_out),
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_basis=config.init_basis,
                generator=gen,
            )
            set_module(model, name, layer)
        for name, module in model.named_modules():
            if matches(name, config.modules_to_save):
                for p in module.parameters():
                    p.requires_grad_(True)
        self._names = names
        self._layer_cache: list[tuple[str, FlexLoRALayer]] = [(n, model.get_submodule(n)) for n in names]  # type: ignore[misc]
        self._orth_in_forward = False  # FSDP2: eq. 2 computed inside each layer's forward (sharding.py)
        # Trainer reads the *class*'s forward signature (label names, dataset columns, loss kwargs): specialise the
        # class per base architecture so that signature is the base model's.
        self.__class__ = _specialised_class(type(model))  # type: ignore[assignment,arg-type]

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sync_orth_mode(self)  # FSDP2: eq. 2 moves into the layers' forward (sharding.py)
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ views
    def flexlora_layers(self) -> Iterator[tuple[str, FlexLoRALayer]]:
        """(module path in the base model, layer) for every adapted matrix, in model order."""
        yield from self._layer_cache  # cached: get_submodule walks the tree (an event's CPU time at 160 matrices)

    @property
    def module_names(self) -> list[str]:
        return list(self._names)

    def rank_map(self) -> dict[str, int]:
        """Module path -> active rank."""
        return {name: layer.rank for name, layer in self.flexlora_layers()}  # host integers: no device sync

    def total_rank(self) -> int:
        return sum(self.rank_map().values())

    def rank_caps(self) -> dict[str, int]:
        """Module path -> slot capacity (the rank cap used by the planner)."""
        return {name: layer.capacity for name, layer in self.flexlora_layers()}

    def importance_scores(self, metric: str | None = None) -> dict[str, float]:
        """Module path -> importance (config.importance by default) of the singular values of its active ΔW
        (`FlexLoRALayer.spectrum`: exact whatever the basis), scored in one vectorised call and one host sync."""
        layers = list(self.flexlora_layers())
        if not layers:
            return {}
        # Spectra go to one device first: a model placed across devices (device_map) has layers on several.
        dev = layers[0][1].lora_lam.device
        R = max(layer.capacity for _, layer in layers)
        spectra = [la.spectrum(full_tensor).to(dev) for _, la in layers]  # (rank,) each; FSDP2: P, Q gathered
        sigma = torch.stack([nn.functional.pad(S, (0, R - S.shape[0])) for S in spectra])  # (M, R)
        ranks = torch.tensor([la.rank for _, la in layers], device=dev)  # (M,)
        mask = torch.arange(R, device=dev)[None, :] < ranks[:, None]  # (M, R): active prefixes
        cfg = self.flexlora_config
        metric = metric or (cfg.importance if cfg.importance != "random" else "entropy")  # a control has no metric
        scores = importance_batched(sigma, mask, metric=metric)  # (M,)
        values = scores.tolist()  # one host sync for all modules
        return {name: float(v) for (name, _), v in zip(layers, values, strict=True)}

    def orth_reg(self) -> torch.Tensor:
        """Eq. 2 averaged over adapted matrices (mean, so γ does not scale with the number of modules)."""
        terms = orth_terms(self.flexlora_layers())  # under FSDP2: the terms of this step's forward
        dev = terms[0].device
        return torch.stack([t.to(dev) for t in terms]).mean()  # per-layer scalars may sit on several devices

    def trainable_parameter_counts(self) -> tuple[int, int, int]:
        """(active adapter + modules_to_save params, allocated trainable params, all params)."""
        active = sum(layer.rank * (layer.in_features + layer.out_features + 1) for _, layer in self.flexlora_layers())
        adapter_ids: set[int] = set()
        for _, layer in self.flexlora_layers():
            adapter_ids.update(id(p) for p in (layer.lora_P, layer.lora_lam, layer.lora_Q))
        others = sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in adapter_ids)
        allocated = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return active + others, allocated, total

    def print_trainable_parameters(self) -> None:
        """Log active trainable parameters (what a fixed-rank LoRA of the same ranks would train) and slots."""
        active, allocated, total = self.trainable_parameter_counts()
        msg = (
            f"trainable params: {active:,} (active ranks; {allocated:,} allocated incl. spare slots) || "
            f"all params: {total:,} || trainable%: {100 * active / max(total, 1):.4f} || "
            f"total rank: {self.total_rank()} over {len(self._names)} matrices"
        )
        print(msg)  # noqa: T201 -- same contract as PEFT's print_trainable_parameters, which prints

    # ------------------------------------------------------------------ capacity
    def finalize_capacity(self, total_steps: int) -> bool:
        """Derive the exact rank caps from `total_steps` and grow slots. Call before the optimizer is created.

        Returns:
            `bool`: whether any parameter was replaced (an optimizer built earlier would hold stale tensors).
        """
        cfg = self.flexlora_config
        if cfg.total_steps is None:
            cfg.total_steps = total_steps
        cfg.validate()
        grown = False
        for name, layer in self.flexlora_layers():
            cap = resolve_capacity(cfg, name, layer.in_features, layer.out_features)
            if cap > layer.capacity:
                refuse_if_sharded(layer, f"finalize_capacity: {name} needs {cap} slots (has {layer.capacity})")
                layer.grow_capacity(cap)
                grown = True
        self.capacity_final = True
        return grown

    # ------------------------------------------------------------------ the seam
    @torch.no_grad()
    def apply_plan(
        self, plan: ReallocationPlan, optimizer: torch.optim.Optimizer | None = None, *, step: int = 0
    ) -> dict[str, list[int]]:
        """Prune and expand as planned; with `optimizer`, reset the moments of every touched slot in place.

        Args:
            plan (`ReallocationPlan`): from `plan_reallocation`.
            optimizer (`torch.optim.Optimizer`, *optional*): the training optimizer (or accelerate's wrapper).
            step (`int`): the optimizer step of this event; seeds the draw of new directions with `config.seed`.

        Returns:
            `dict` module path -> slots touched (pruned, moved or activated).
        """
        cfg = self.flexlora_config
        gen = expansion_generator(cfg.seed, step)
        touched: dict[str, list[int]] = {}
        resets: dict[str, list[int]] = {}  # slots whose optimizer state starts at zero
        moves: list[tuple[FlexLoRALayer, int, int]] = []  # (layer, src, dst): state follows a moved direction
        layers = dict(self.flexlora_layers())
        involved = set(plan.prune) | set(plan.expand)
        # FSDP2: whole copies of the touched layers and their moments during the edit (a no-op otherwise).
        with gathered([layer for name, layer in layers.items() if name in involved], optimizer):
            for name in plan.prune:
                rank_before = layers[name].rank
                slot, moved_from = layers[name].prune_smallest(rotate=cfg.svd_prune)
                touched.setdefault(name, []).append(slot)
                if cfg.svd_prune:  # every direction was rotated: its moments no longer match it, so all restart
                    touched[name] = list(range(rank_before))
                    resets[name] = list(range(rank_before))
                    # and each restarts its own Adam bias correction
                    layers[name].slot_birth = {s: step for s in range(rank_before - 1)}
                elif moved_from is None:
                    resets.setdefault(name, []).append(slot)
                else:  # the last active direction now fills the hole; its old slot is free (and zeroed by the move)
                    moves.append((layers[name], moved_from, slot))
                    touched[name].append(moved_from)
            for name in plan.expand:  # fixed order -> the same draws on every process
                # a young slot gets its own Adam bias correction (slot_age.py)
                slot = layers[name].expand(gen, init=cfg.expansion_init, step=step)
                touched.setdefault(name, []).append(slot)
                resets.setdefault(name, []).append(slot)
            if optimizer is not None and touched:
                move_slots(optimizer, moves)
                reset_slots(optimizer, [(layers[n], slots) for n, slots in resets.items()])
        if optimizer is not None and touched:
            SlotAgeCorrection.attach(optimizer, step, layers.values())
        return touched

    # ------------------------------------------------------------------ adapters on/off
    def disable_adapters(self) -> None:
        for _, layer in self.flexlora_layers():
            layer.disabled = True

    def enable_adapters(self) -> None:
        for _, layer in self.flexlora_layers():
            layer.disabled = False

    # ------------------------------------------------------------------ custom training loops
    def update_and_allocate(self, global_step: int, optimizer: Any = None) -> dict[str, Any] | None:
        """Run the reallocation event scheduled after optimizer step `global_step`, or do nothing.

        Call it after every `optimizer.step()` in a custom (accelerate / plain PyTorch) loop, with the 1-based count
        of optimizer steps done so far and the optimizer, exactly as `FlexLoRACallback` does inside the Trainer. Needs
        `total_steps` in the config (or a prior `finalize_capacity(total_steps)`, before the optimizer is built).

        Returns:
            `dict` or `None`: the rank-history record of the event (also appended to `rank_history`), or `None`
            when no event is scheduled at `global_step`.
        """
        return update_and_allocate(self, global_step, optimizer)

    def attach_optimizer(self, optimizer: Any, global_step: int = 0) -> None:
        """Hook the per-direction Adam correction (`slot_age.py`) of the directions still young at
        `global_step` onto `optimizer`. Custom loops call it once when they resume (after loading the adapter and the
        optimizer state; `FlexLoRATrainer` does it at train start); events attach it themselves."""
        SlotAgeCorrection.attach(optimizer, global_step, [layer for _, layer in self.flexlora_layers()])

    def to_lora_config(self, *, alpha_policy: str = "constant_scale", **kwargs: Any) -> Any:
        """A `peft.LoraConfig` with this model's rank allocation, to train a plain LoRA with FlexLoRA's ranks; see
        `flexlora_hf.io.transfer.to_lora_config` (`alpha_policy="constant_scale"` keeps the scale lora_alpha / r)."""
        from ..io.transfer import to_lora_config

        return to_lora_config(self, alpha_policy=alpha_policy, **kwargs)

    # ------------------------------------------------------------------ persistence (io/, hub.py)
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Save both views, rank map, history, heatmap and card; see `flexlora_hf.save_flexlora` (under FSDP2 call
        it on every process: the adapter is gathered, a collective; process 0 writes)."""
        from ..io.save import save_flexlora

        save_flexlora(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
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
            path_or_repo_id (`str` or `os.PathLike`): folder written by `save_pretrained`, or a Hub repo id.
            is_trainable (`bool`, *optional*, defaults to `False`): if `False` every parameter is frozen, the model
                is put in eval mode and each layer holds exactly its active directions (no spare slots: unmerged
                inference costs what a PEFT LoRA of the same ranks costs); if `True` the adapter and
                `modules_to_save` are trainable and the saved slot capacity is restored.
            revision (`str`, *optional*): branch, tag or commit of the Hub repo.
            token (`str` or `bool`, *optional*): Hub token for private repos (never written anywhere).
            config_overrides (`dict`, *optional*): `FlexLoRAConfig` fields to change (e.g. a new `total_steps`).

        Raises:
            FileNotFoundError: a required file is missing.
            ValueError: corrupt/truncated file, base model without an adapted module or with other shapes, or
                files that disagree with each other; the message names the file or module and the cause.
        """
        from ..io.hub import resolve_directory
        from ..io.native import check_base_model, read_adapter, restore

        directory = resolve_directory(os.fspath(path_or_repo_id), revision=revision, token=token)
        saved = read_adapter(directory, config_overrides)
        check_base_model(base_model, saved)  # everything is checked before the base model is modified
        # Build on exactly the saved modules with the saved capacities, then restore the user-facing config values
        # so that re-saving round-trips them and `finalize_capacity` keeps its meaning.
        config = saved.config
        build_config = dataclasses.replace(config, target_modules=list(saved.modules), max_rank=dict(saved.capacity))  # type: ignore[arg-type]
        model = FlexLoRAModel(base_model, build_config)
        if set(model.module_names) != set(saved.modules):
            unexpected = sorted(set(model.module_names) - set(saved.modules))
            raise ValueError(f"load_flexlora: the base model adapted unexpected modules {unexpected[:5]}.")
        model.flexlora_config.target_modules = config.target_modules
        model.flexlora_config.max_rank = config.max_rank
        if not is_trainable:  # inference: exactly the active directions, no training capacity (costs what LoRA costs)
            saved.capacity = {name: int(parts["lam"].shape[0]) for name, parts in saved.modules.items()}
        restore(model, saved)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
        logger.info(
            "Loaded FlexLoRA adapter (%d matrices, total rank %d) from %s",
            len(saved.modules), model.total_rank(), directory,
        )
        return model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the saved adapter folder with its model card; see `flexlora_hf.push_to_hub`."""
        from ..io.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def merge_and_unload(self) -> nn.Module:
        """Merge ΔW into every wrapped layer and return the plain base model (no adapter code needed to use it)."""
        layers = list(self.flexlora_layers())
        for _, layer in layers:  # refuse before touching anything: no half-merged model
            check_mergeable(layer)
        for name, layer in layers:
            set_module(self.base_model, name, merged_base_layer(layer))
        self._names = []
        self._layer_cache = []
        return self.base_model


@functools.cache
def _specialised_class(base_cls: Any) -> type:
    """`FlexLoRAModel` subclass whose `forward` carries `base_cls.forward`'s signature; named after the base class
    (`FlexLoRABertForQuestionAnswering`) because transformers' `find_labels` also looks at the class name."""

    def forward(self: FlexLoRAModel, *args: Any, **kwargs: Any) -> Any:
        sync_orth_mode(self)  # FSDP2: eq. 2 moves into the layers' forward (sharding.py)
        return self.base_model(*args, **kwargs)

    forward.__signature__ = inspect.signature(base_cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = base_cls.forward.__doc__
    return type(f"FlexLoRA{base_cls.__name__}", (FlexLoRAModel,), {"forward": forward, "__module__": __name__})


def get_flexlora_model(model: nn.Module, config: FlexLoRAConfig) -> FlexLoRAModel:
    """Wrap `model` with FlexLoRA adapters as described by `config`.

    Freezes the base model, wraps every targeted linear layer in a `FlexLoRALayer` (r active directions, ΔW = 0 so
    the output equals the base model's) and makes `modules_to_save` trainable (a classifier head is found
    automatically for `*ForSequenceClassification` models). Returns a `FlexLoRAModel`.
    """
    if isinstance(model, FlexLoRAModel):
        raise ValueError("get_flexlora_model: the model is already a FlexLoRAModel.")
    wrapped = FlexLoRAModel(model, config)
    config.validate(n_modules=len(wrapped.module_names) if config.b0 else None)
    return wrapped


def load_flexlora(
    base_model: nn.Module, path_or_repo_id: str | os.PathLike[str], **kwargs: Any
) -> FlexLoRAModel:
    """Function form of [`FlexLoRAModel.from_pretrained`] (same arguments)."""
    return FlexLoRAModel.from_pretrained(base_model, path_or_repo_id, **kwargs)
