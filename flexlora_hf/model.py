"""`FlexLoRAModel` and `get_flexlora_model`: injection of FlexLoRA layers into a transformers model.

Owns target matching (names / regex / "all-linear", as in PEFT), freezing, `modules_to_save`, slot capacity (the
per-module rank cap), the model-level views (`rank_map`, `importance_scores`, `orth_reg`) and `apply_plan`, the one
seam where a pure `ReallocationPlan` meets the tensors. Saving, loading, export and Hub upload live in
`serialization.py` / `hub.py`; optimizer state surgery in `optim_surgery.py`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .allocation import ReallocationPlan
from .config import FlexLoRAConfig
from .importance import importance_batched
from .layer import FlexLoRALayer, is_supported_layer, layer_shape
from .quantization import guard_bnb_cpu
from .schedule import event_steps

logger = logging.getLogger(__name__)

_HEAD_NAMES = ("classifier", "score", "lm_head")
_CLS_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification")


def expansion_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the draws of the event at `step`: same seed on every process, independent of history."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def _output_head_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def default_modules_to_save(model: nn.Module) -> list[str] | None:
    """Classification heads that PEFT's SEQ_CLS/TOKEN_CLS task types would train in full."""
    if not type(model).__name__.endswith(_CLS_SUFFIXES):
        return None
    found = [h for h in ("classifier", "score") if any(n == h or n.endswith("." + h) for n, _ in model.named_modules())]
    return found or None


def _matches(name: str, patterns: list[str] | None) -> bool:
    return bool(patterns) and any(name == p or name.endswith("." + p) for p in patterns or [])


def find_target_modules(model: nn.Module, config: FlexLoRAConfig) -> list[str]:
    """Module paths to wrap, in model order. Raises `ValueError` listing the model's linear layers if none match."""
    linear_names = [n for n, m in model.named_modules() if n and is_supported_layer(m)]
    save = list(config.modules_to_save or [])
    # A module trained in full is not also adapted, nor are the linear layers inside it (RoBERTa's classifier.out_proj).
    excluded = {n for n in linear_names if any(_matches(".".join(n.split(".")[:k]), save) for k in range(1, n.count(".") + 2))}
    target = config.target_modules if config.target_modules is not None else "all-linear"
    chosen: list[str]
    if target == "all-linear":
        heads = _output_head_names(model)
        chosen = [
            n
            for n in linear_names
            if n not in excluded and n not in heads and n.split(".")[-1] not in _HEAD_NAMES
        ]
    elif isinstance(target, str):
        pattern = re.compile(target)
        chosen = [n for n in linear_names if n not in excluded and pattern.fullmatch(n)]
    else:
        targets = list(target)
        chosen = [n for n in linear_names if n not in excluded and _matches(n, targets)]
        suffixes = {n.split(".")[-1] for n in linear_names}
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
        if unknown:
            raise ValueError(
                f"target_modules {unknown} match no linear layer of {type(model).__name__}. "
                f"Its linear module names are: {', '.join(sorted(suffixes))}."
            )
    if not chosen:
        raise ValueError(
            f"target_modules={target!r} matches no linear layer of {type(model).__name__}. "
            f"Its linear module names are: {', '.join(sorted({n.split('.')[-1] for n in linear_names}))}."
        )
    return chosen


def resolve_capacity(config: FlexLoRAConfig, name: str, d_in: int, d_out: int) -> int:
    """Slots for one module: the user cap, else exactly r + number of scheduled events; bounded by min(d_in, d_out).

    Each event adds at most one direction to a module, so r + #events can never be exceeded. Without `total_steps`
    the capacity is provisional (r) and `FlexLoRAModel.finalize_capacity` grows it before the optimizer exists.
    """
    bound = min(d_in, d_out)
    cap = config.max_rank.get(name) if isinstance(config.max_rank, Mapping) else config.max_rank
    if cap is None:
        if config.allocation == "prune_only" or config.total_steps is None:
            cap = config.r
        else:
            n_events = len(
                event_steps(
                    b0=config.b0,
                    t_warmup=config.t_warmup,
                    t_final=config.t_final,
                    total_steps=config.total_steps,
                    delta_t=config.delta_t,
                    schedule=config.schedule,
                )
            )
            cap = config.r + n_events
    return max(config.r, min(int(cap), bound))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
                init_scale=config.init_scale,
                generator=gen,
            )
            _set_module(model, name, layer)
        for name, module in model.named_modules():
            if _matches(name, list(config.modules_to_save or [])):
                for p in module.parameters():
                    p.requires_grad_(True)
        self._names = names
        self._layer_cache: list[tuple[str, FlexLoRALayer]] = [(n, model.get_submodule(n)) for n in names]  # type: ignore[misc]
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
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ views
    def flexlora_layers(self) -> Iterator[tuple[str, FlexLoRALayer]]:
        """(module path in the base model, layer) for every adapted matrix, in model order."""
        # Cached: get_submodule walks the module tree and dominated an event's CPU time at 160 matrices.
        yield from self._layer_cache

    @property
    def module_names(self) -> list[str]:
        return list(self._names)

    def rank_map(self) -> dict[str, int]:
        """Module path -> active rank."""
        layers = list(self.flexlora_layers())
        if not layers:
            return {}
        counts = torch.stack([layer.lora_active.sum() for _, layer in layers]).tolist()  # one host sync
        return {name: int(c) for (name, _), c in zip(layers, counts, strict=True)}

    def total_rank(self) -> int:
        return sum(self.rank_map().values())

    def rank_caps(self) -> dict[str, int]:
        """Module path -> slot capacity (the rank cap used by the planner)."""
        return {name: layer.capacity for name, layer in self.flexlora_layers()}

    def importance_scores(self, metric: str | None = None) -> dict[str, float]:
        """Module path -> importance of its active λ (config.importance by default), one vectorised call."""
        layers = list(self.flexlora_layers())
        if not layers:
            return {}
        R = max(layer.capacity for _, layer in layers)
        lam = torch.stack([nn.functional.pad(layer.lora_lam.detach(), (0, R - layer.capacity)) for _, layer in layers])
        mask = torch.stack([nn.functional.pad(layer.lora_active, (0, R - layer.capacity)) for _, layer in layers])
        cfg = self.flexlora_config
        scores = importance_batched(lam, mask, metric=metric or cfg.importance, eps=cfg.entropy_eps)  # (M,)
        values = scores.tolist()  # one host sync for all modules
        return {name: float(v) for (name, _), v in zip(layers, values, strict=True)}

    def orth_reg(self) -> torch.Tensor:
        """Eq. 2 averaged over adapted matrices (mean, so γ does not scale with the number of modules)."""
        terms = [layer.orth_reg() for _, layer in self.flexlora_layers()]
        return torch.stack(terms).mean()

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
            `dict` module path -> slots touched (pruned or activated).
        """
        cfg = self.flexlora_config
        gen = expansion_generator(cfg.seed, step)
        touched: dict[str, list[int]] = {}
        layers = dict(self.flexlora_layers())
        for name in plan.prune:
            touched.setdefault(name, []).append(layers[name].prune_smallest())
        for name in plan.expand:  # fixed order -> the same draws on every process
            slot = layers[name].expand(gen, init=cfg.expansion_init, small_value=cfg.small_init_value)
            touched.setdefault(name, []).append(slot)
        if optimizer is not None and touched:
            from .optim_surgery import reset_slots

            reset_slots(optimizer, [(layers[n], slots) for n, slots in touched.items()])
        return touched

    # ------------------------------------------------------------------ adapters on/off
    def disable_adapters(self) -> None:
        for _, layer in self.flexlora_layers():
            layer.disabled = True

    def enable_adapters(self) -> None:
        for _, layer in self.flexlora_layers():
            layer.disabled = False

    # ------------------------------------------------------------------ persistence (see serialization.py / hub.py)
    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        from .serialization import save_flexlora

        save_flexlora(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path_or_repo_id: str, **kwargs: Any) -> FlexLoRAModel:
        from .serialization import load_flexlora

        return load_flexlora(base_model, path_or_repo_id, **kwargs)

    def merge_and_unload(self) -> nn.Module:
        """Merge ΔW into every wrapped layer and return the plain base model (no adapter code needed to use it)."""
        layers = list(self.flexlora_layers())
        for _, layer in layers:  # refuse before touching anything: no half-merged model
            layer.check_mergeable()
        for name, layer in layers:
            _set_module(self.base_model, name, layer.merged_base_layer())
        self._names = []
        self._layer_cache = []
        return self.base_model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


@functools.cache
def _specialised_class(base_cls: Any) -> type:
    """`FlexLoRAModel` subclass whose `forward` carries `base_cls.forward`'s signature; named after the base class
    (`FlexLoRABertForQuestionAnswering`) because transformers' `find_labels` also looks at the class name."""

    def forward(self: FlexLoRAModel, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    forward.__signature__ = inspect.signature(base_cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = base_cls.forward.__doc__
    return type(f"FlexLoRA{base_cls.__name__}", (FlexLoRAModel,), {"forward": forward, "__module__": __name__})


def get_flexlora_model(model: nn.Module, config: FlexLoRAConfig) -> FlexLoRAModel:
    """Wrap `model` with FlexLoRA adapters as described by `config`.

    Freezes the base model, wraps every targeted linear layer in a `FlexLoRALayer` (r active directions, λ = 0 so the
    output equals the base model's) and makes `modules_to_save` trainable (a classifier head is found automatically
    for `*ForSequenceClassification` models).

    Args:
        model (`nn.Module`): a transformers model (or any module with linear layers).
        config (`FlexLoRAConfig`): adapter and schedule configuration.

    Returns:
        `FlexLoRAModel`
    """
    if isinstance(model, FlexLoRAModel):
        raise ValueError("get_flexlora_model: the model is already a FlexLoRAModel.")
    wrapped = FlexLoRAModel(model, config)
    config.validate(n_modules=len(wrapped.module_names) if config.b0 else None)
    return wrapped
