"""Trainer integration: `FlexLoRACallback` (scheduled reallocation) and `FlexLoRATrainer` (loss, saving, wiring).

This module only wires things together: an event is `events.update_and_allocate` (the same call a custom loop
makes), the rank history is written by `io.history`, the adapter folder by `io.save`.

Hook order (transformers 5.x): micro-batches -> clip -> `optimizer.step()` -> `lr_scheduler.step()` -> `zero_grad()`
-> `global_step += 1` -> **`on_step_end`** (our event, on optimizer step t = `state.global_step`) -> log/save/eval.
So events count optimizer steps, never micro-batches, and a checkpoint written at step t already holds the ranks
chosen at t.

* `FlexLoRACallback` works with any `Trainer` subclass whose model is a `FlexLoRAModel`. It performs events, records
  the rank history and writes `rank_history.json` + `rank_heatmap.png` at the end. The orthogonality term and the
  Trainer-logged metrics need the loss hook: mix `FlexLoRATrainerMixin` into your Trainer subclass
  (`class MyTrainer(FlexLoRATrainerMixin, MyBaseTrainer)`), which is exactly what `FlexLoRATrainer` is.
* Restarts (resume, best-model reload, a second `train()`) live in `trainer_restart.py`, the model card and Hub push
  in `trainer_card.py`; both are bases of `FlexLoRATrainerMixin`.
* Optimizers: the one the Trainer builds holds the final-capacity adapter (`create_optimizer` derives the caps
  first); one passed in `optimizers=(...)` must already hold it, which `optim.surgery.check_optimizer_holds_adapter`
  checks at train start (else the adapter would silently never train).
* Weight decay: λ is excluded from decay (it is a singular value, and decaying it would bias the importance metric
  towards pruning by magnitude); P and Q follow `args.weight_decay`.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..adapter.events import event_logs, update_and_allocate, validate_schedule
from ..adapter.model import FlexLoRAModel, get_flexlora_model
from ..config import FlexLoRAConfig
from ..io.history import write_rank_history
from ..optim.surgery import (
    LAMBDA_PARAM,
    check_optimizer_holds_adapter,
    check_optimizer_supported,
    check_state_layout,
    unwrap_optimizer,
)
from .trainer_card import TrainerCardMixin
from .trainer_restart import TrainerRestartMixin

logger = logging.getLogger(__name__)


def unwrap_flexlora(model: Any) -> FlexLoRAModel:
    """Find the `FlexLoRAModel` inside DDP / accelerate / compile wrappers."""
    seen = 0
    while not isinstance(model, FlexLoRAModel) and seen < 6:
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    if not isinstance(model, FlexLoRAModel):
        raise TypeError(
            "FlexLoRACallback needs a FlexLoRAModel: wrap the model with get_flexlora_model(model, config) or use "
            "FlexLoRATrainer(..., flexlora_config=...)."
        )
    return model


class FlexLoRACallback(TrainerCallback):
    """Performs FlexLoRA reallocation events (Algorithm 1 with the budget of eq. 4) during `Trainer.train()`.

    After optimizer step t, if t is on the Δ_T grid inside `(t_warmup, T - t_final]` and b(t) > 0, every module's
    importance is computed, a plan is made (`plan_reallocation`), and `FlexLoRAModel.apply_plan` prunes, expands and
    resets the optimizer moments of the touched slots in place. Every process of a distributed run applies process 0's
    plan (`events.agree_across_processes`) and draws the same new directions (generator seeded by config seed + step).
    """

    def __init__(self) -> None:
        self.pending_logs: dict[str, float] = {}
        self.with_mixin = False  # set by FlexLoRATrainerMixin, which adds the orthogonality term to the loss
        self._checked_state = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        fm = unwrap_flexlora(kwargs["model"])
        cfg = fm.flexlora_config
        if cfg.total_steps is None:
            cfg.total_steps = state.max_steps
        elif cfg.total_steps != state.max_steps:
            logger.warning(
                "FlexLoRAConfig.total_steps=%d differs from the Trainer's max_steps=%d; the schedule uses %d.",
                cfg.total_steps,
                state.max_steps,
                cfg.total_steps,
            )
        if not fm.capacity_final:
            raise ValueError(
                "FlexLoRA rank caps were not derived before the optimizer was built (this Trainer does not use "
                "FlexLoRATrainerMixin). Pass total_steps or max_rank in FlexLoRAConfig, or call "
                "model.finalize_capacity(max_steps) before creating the Trainer."
            )
        check_distributed_engine(args)
        validate_schedule(cfg, n_modules=len(fm.module_names))
        if not self.with_mixin and cfg.orth_reg_weight > 0:
            logger.warning(
                "FlexLoRACallback is used without FlexLoRATrainerMixin, so the orthogonality term of eq. 2 "
                "(orth_reg_weight=%g) is NOT added to the loss. Use FlexLoRATrainer, or mix FlexLoRATrainerMixin into "
                "your Trainer (class MyTrainer(FlexLoRATrainerMixin, MyTrainer)), or set orth_reg_weight=0 to train "
                "without it on purpose.",
                cfg.orth_reg_weight,
            )
        self._checked_state = False  # a later train() may bring another optimizer
        for _, layer in fm.flexlora_layers():
            # A birth after this run's first step belongs to an earlier run (an adapter loaded without resuming, a
            # second train()): its age would be negative for this run's step counts, so the direction counts as old.
            layer.slot_birth = {s: b for s, b in layer.slot_birth.items() if b <= state.global_step}
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            check_optimizer_supported(optimizer)
            check_optimizer_holds_adapter(optimizer, fm.flexlora_layers())  # else the adapter would never train
            if any(layer.slot_birth for _, layer in fm.flexlora_layers()):
                fm.attach_optimizer(optimizer, state.global_step)  # resumed with young directions (births were saved)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        fm = unwrap_flexlora(kwargs["model"])
        if not self._checked_state and kwargs.get("optimizer") is not None:
            # After the first step the optimizer state exists: refuse layouts FlexLoRA cannot reset per direction
            # (quantised or tensor-subclass states, e.g. torchao's low-bit AdamW) before any event relies on it.
            check_state_layout(kwargs["optimizer"], [layer for _, layer in fm.flexlora_layers()])
            self._checked_state = True
        record = update_and_allocate(fm, state.global_step, kwargs.get("optimizer"))
        if record is not None:
            self.pending_logs = event_logs(record)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        fm = unwrap_flexlora(kwargs["model"])
        write_rank_history(fm, args.output_dir or ".")


LORA_TYPICAL_LR = 2e-3
"""At or below this rate `FlexLoRATrainer` logs one line if the basis is one that learned late at LoRA's rate."""


def check_distributed_engine(args: TrainingArguments, trainer: Any = None) -> None:
    """Refuse FSDP and DeepSpeed in the Trainer clearly at train start (never silently wrong), whether they come
    from the TrainingArguments or from an accelerate config / environment (the Trainer's `is_fsdp_enabled`).

    FSDP2 works in a custom loop (`fully_shard`; `sharding.py`, tested on 2 CPU processes). Through the Trainer it is
    refused: checkpoint saving would have to gather the adapter on every process (the Trainer saves on process 0
    only), and on CPU accelerate silently falls back to DDP, so that path cannot be tested here. FSDP1 and DeepSpeed
    ZeRO flatten parameters and optimizer states into buffers in which a direction is no longer addressable.
    """
    fsdp = bool(getattr(args, "fsdp", None)) or bool(getattr(trainer, "is_fsdp_enabled", False))
    deepspeed = bool(getattr(args, "deepspeed", None)) or bool(getattr(trainer, "is_deepspeed_enabled", False))
    engine = "FSDP" if fsdp else "DeepSpeed" if deepspeed else None
    if engine:
        raise ValueError(
            f"FlexLoRATrainer does not support {engine}: rank reallocation needs whole λ vectors and per-direction "
            "optimizer state, which the Trainer's sharded engines do not expose. Use DDP (torchrun / accelerate "
            "launch without an FSDP or DeepSpeed config; adapter training on a 4-bit base fits LLaMA3-8B on one GPU "
            "per process), or FSDP2 in your own loop: fully_shard the FlexLoRA model and call "
            "model.update_and_allocate(step, optimizer) after each step (examples/accelerate_loop.py --fsdp2)."
        )


class FlexLoRATrainerMixin(TrainerRestartMixin, TrainerCardMixin):
    """Adds FlexLoRA to a `Trainer` subclass: wrapping, orthogonality loss, logging, saving, and (from its bases)
    resume and restarts (`trainer_restart.py`), the model card and Hub push (`trainer_card.py`).

    Use as `class MyTrainer(FlexLoRATrainerMixin, SomeTrainer)`. Accepts every `Trainer` keyword plus
    `flexlora_config`; if `model` is not a `FlexLoRAModel` it is wrapped with that config, otherwise the model's own
    config is used.
    """

    def __init__(self, *args: Any, flexlora_config: FlexLoRAConfig | None = None, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("FlexLoRATrainer needs a model.")
        if not isinstance(model, FlexLoRAModel):
            if flexlora_config is None:
                raise ValueError(
                    "FlexLoRATrainer got a plain model and no flexlora_config: "
                    "pass flexlora_config=FlexLoRAConfig(...) or a model wrapped with get_flexlora_model."
                )
            model = get_flexlora_model(model, flexlora_config)
            if "model" in kwargs:
                kwargs["model"] = model
            else:
                args = (model, *args[1:])
        elif flexlora_config is not None and flexlora_config is not model.flexlora_config:
            logger.warning("FlexLoRATrainer: the model is already a FlexLoRAModel; ignoring flexlora_config.")
        callbacks = list(kwargs.get("callbacks") or [])
        self.flexlora_callback = next((c for c in callbacks if isinstance(c, FlexLoRACallback)), None)
        if self.flexlora_callback is None:
            self.flexlora_callback = FlexLoRACallback()
            callbacks.append(self.flexlora_callback)
        self.flexlora_callback.with_mixin = True
        kwargs["callbacks"] = callbacks
        # The orthogonality value for logging is summed on the device and read when the Trainer logs: reading it
        # every micro-batch (float(...)) would add a host sync to every step.
        self._orth_sum: torch.Tensor | None = None
        self._orth_count = 0
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None and targs.ddp_find_unused_parameters is None and not targs.gradient_checkpointing:
            # Every adapter parameter is in the graph (the active prefix is a view of it), so DDP's search for
            # unused parameters is pure cost. Set on a copy, before the parent builds the accelerator (transformers
            # 5 reads it there); the caller's TrainingArguments object is never modified.
            targs = copy.copy(targs)
            targs.ddp_find_unused_parameters = False
            if "args" in kwargs or len(args) <= 1:
                kwargs["args"] = targs
            else:
                args = (args[0], targs, *args[2:])
        super().__init__(*args, **kwargs)
        check_distributed_engine(self.args, self)  # type: ignore[attr-defined]  # incl. an accelerate config's FSDP
        lr = float(self.args.learning_rate)  # type: ignore[attr-defined]
        basis = self.flexlora_model.flexlora_config.init_basis
        if lr <= LORA_TYPICAL_LR and basis != "lora_like":
            logger.info(
                "FlexLoRA: learning_rate=%g is a LoRA-typical rate, and init_basis=%r starts with λ = 0: at LoRA's "
                "rate that start learned later than LoRA on the decoder check, where the default "
                "init_basis='lora_like' kept up with it; see docs/benchmarks.md.",
                lr, basis,
            )

    @property
    def flexlora_model(self) -> FlexLoRAModel:
        return unwrap_flexlora(self.model)  # type: ignore[attr-defined]

    # -------------------------------------------------------------- optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        # Capacity must be final before the optimizer holds the parameters (it may replace slot tensors).
        fm = self.flexlora_model
        if not fm.capacity_final or fm.flexlora_config.total_steps is None:
            fm.finalize_capacity(self.state.max_steps)  # type: ignore[attr-defined]
        fresh = getattr(self, "optimizer", None) is None
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        if fresh:  # not the caller's optimizer (check_optimizer_holds_adapter checks that one at train start)
            self._own_optimizer = unwrap_optimizer(optimizer)
        return optimizer

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)  # type: ignore[misc]
        return [n for n in names if n.rsplit(".", 1)[-1] != LAMBDA_PARAM]  # λ is never decayed

    # -------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)  # type: ignore[misc]
        fm = self.flexlora_model
        gamma = fm.flexlora_config.orth_reg_weight
        if gamma <= 0 or not model.training:
            return out
        reg = fm.orth_reg()
        value = reg.detach()
        self._orth_sum = value if self._orth_sum is None else self._orth_sum + value
        self._orth_count += 1
        # Mirror Trainer.training_step: when the task loss is already normalised for gradient accumulation (it
        # was divided by num_items_in_batch of the whole step) the Trainer will not divide by GA steps, so we do
        # it here; otherwise it divides our term too. Either way γ·R enters each optimizer step once. DDP averages
        # gradients across processes, and every process adds the same γ·R, so no world-size factor is needed (the
        # world-size multiplication Trainer applies to the task loss happens inside compute_loss, before this).
        term = gamma * reg
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            term = term / self.current_gradient_accumulation_steps  # type: ignore[attr-defined]
        if return_outputs:
            loss, outputs = out
            return loss + term.to(loss.dtype), outputs
        return out + term.to(out.dtype)

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    # -------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            if self._orth_count and self._orth_sum is not None:
                logs["orth_reg"] = round(float(self._orth_sum) / self._orth_count, 6)  # the one sync, at log time
                self._orth_sum, self._orth_count = None, 0
            assert self.flexlora_callback is not None
            logs.update(self.flexlora_callback.pending_logs)
            self.flexlora_callback.pending_logs = {}
            logs["flexlora/total_rank"] = float(self.flexlora_model.total_rank())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # -------------------------------------------------------------- saving (loading: trainer_restart.py)
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and `save_model()` write the FlexLoRA adapter directory, never the full base model."""
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving FlexLoRA adapter to %s", output_dir)
        self.flexlora_model.save_pretrained(output_dir)
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(output_dir)  # type: ignore[attr-defined]
        torch.save(args, os.path.join(output_dir, "training_args.bin"))  # same file Trainer writes

    def save_rank_history(self, output_dir: str | None = None) -> None:
        """Write `rank_history.json` and the heatmap to `output_dir` (default: `args.output_dir`)."""
        write_rank_history(self.flexlora_model, output_dir or self.args.output_dir)  # type: ignore[attr-defined]


class FlexLoRATrainer(FlexLoRATrainerMixin, Trainer):
    """`transformers.Trainer` with FlexLoRA: swap `Trainer` for `FlexLoRATrainer` and pass `flexlora_config`.

    Example:

    ```python
    >>> from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer
    >>> trainer = FlexLoRATrainer(model=model, args=training_args, train_dataset=train_ds,
    ...                           flexlora_config=FlexLoRAConfig(r=8, lora_alpha=16, b0=4,
    ...                                                          t_warmup=500, t_final=500, delta_t=100))
    >>> trainer.train()
    ```
    """
