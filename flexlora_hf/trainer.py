"""Trainer integration: `FlexLoRACallback` (scheduled reallocation) and `FlexLoRATrainer` (loss, saving, wiring).

This module only wires things together; the math lives in `importance` / `schedule` / `allocation`, the tensors in
`layer` / `model`, the optimizer state in `optim_surgery`.

Hook order (transformers 5.x): micro-batches -> clip -> `optimizer.step()` -> `lr_scheduler.step()` -> `zero_grad()`
-> `global_step += 1` -> **`on_step_end`** (our event, on optimizer step t = `state.global_step`) -> log/save/eval.
So events count optimizer steps, never micro-batches, and a checkpoint written at step t already holds the ranks
chosen at t.

* `FlexLoRACallback` works with any `Trainer` subclass whose model is a `FlexLoRAModel`. It performs events, records
  the rank history and writes `rank_history.json` + `rank_heatmap.png` at the end. The orthogonality term and the
  Trainer-logged metrics need the loss hook: mix `FlexLoRATrainerMixin` into your Trainer subclass
  (`class MyTrainer(FlexLoRATrainerMixin, MyBaseTrainer)`), which is exactly what `FlexLoRATrainer` is.
* Weight decay: λ is excluded from decay (it is a singular value, and decaying it would bias the importance metric
  towards pruning by magnitude); P and Q follow `args.weight_decay`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .allocation import plan_reallocation
from .config import FlexLoRAConfig
from .model import FlexLoRAModel, get_flexlora_model
from .optim_surgery import check_optimizer_supported
from .schedule import budget_at, event_steps, is_event_step
from .serialization import HEATMAP_NAME, RANK_HISTORY_NAME, _write_json

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
    resets the optimizer moments of the touched slots in place. Every process of a distributed run computes the same
    plan from the same (synchronised) λ and draws the same new directions (generator seeded by config seed + step).
    """

    def __init__(self) -> None:
        self.pending_logs: dict[str, float] = {}

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
        validate_schedule(cfg, n_modules=len(fm.module_names))
        if kwargs.get("optimizer") is not None:
            check_optimizer_supported(kwargs["optimizer"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        fm = unwrap_flexlora(kwargs["model"])
        cfg = fm.flexlora_config
        t = state.global_step
        assert cfg.total_steps is not None
        sched = dict(b0=cfg.b0, t_warmup=cfg.t_warmup, t_final=cfg.t_final, total_steps=cfg.total_steps)
        if not is_event_step(t, delta_t=cfg.delta_t, schedule=cfg.schedule, **sched):
            return
        b = budget_at(t, schedule=cfg.schedule, **sched)
        record = run_event(fm, b, t, kwargs.get("optimizer"))
        self.pending_logs = {
            "flexlora/total_rank": float(sum(record["ranks"].values())),
            "flexlora/mean_importance": float(sum(record["scores"].values()) / max(len(record["scores"]), 1)),
            "flexlora/moves": float(len(record["prune"]) + len(record["expand"])),
            "flexlora/budget": float(b),
        }
        logger.info(
            "FlexLoRA event at step %d: b=%d, pruned %d, expanded %d, total rank %d",
            t,
            b,
            len(record["prune"]),
            len(record["expand"]),
            sum(record["ranks"].values()),
        )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        fm = unwrap_flexlora(kwargs["model"])
        write_rank_history(fm, args.output_dir or ".")


def run_event(fm: FlexLoRAModel, b: int, step: int, optimizer: Any = None) -> dict[str, Any]:
    """Score, plan and apply one event; append and return its rank-history record."""
    cfg = fm.flexlora_config
    scores = fm.importance_scores()
    plan = plan_reallocation(
        scores, fm.rank_map(), b, min_rank=cfg.min_rank, max_rank=fm.rank_caps(), allocation=cfg.allocation
    )
    fm.apply_plan(plan, optimizer, step=step)
    record = {
        "step": step,
        "budget": b,
        "prune": list(plan.prune),
        "expand": list(plan.expand),
        "scores": scores,
        "ranks": fm.rank_map(),
    }
    fm.rank_history.append(record)
    return record


def validate_schedule(cfg: FlexLoRAConfig, n_modules: int) -> None:
    """Fail at train start (not mid-run) when the schedule can never fire or the budget cannot fit."""
    assert cfg.total_steps is not None
    cfg.validate(n_modules=n_modules)
    if cfg.b0 > 0 and not event_steps(
        b0=cfg.b0,
        t_warmup=cfg.t_warmup,
        t_final=cfg.t_final,
        total_steps=cfg.total_steps,
        delta_t=cfg.delta_t,
        schedule=cfg.schedule,
    ):
        raise ValueError(
            f"FlexLoRA schedule has no event: no multiple of delta_t={cfg.delta_t} in (t_warmup={cfg.t_warmup}, "
            f"total_steps - t_final={cfg.total_steps - cfg.t_final}] with b(t) > 0. Lower delta_t, t_warmup or "
            "t_final, or train for more steps (set b0=0 to train a fixed-rank adapter on purpose)."
        )


def write_rank_history(fm: FlexLoRAModel, output_dir: str) -> None:
    """Write `rank_history.json` and the heatmap PNG (paper Figure 2) to `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    _write_json(os.path.join(output_dir, RANK_HISTORY_NAME), fm.rank_history)  # same atomic writer as save_pretrained
    try:
        from .plotting import plot_rank_history

        plot_rank_history(fm, os.path.join(output_dir, HEATMAP_NAME))
    except ImportError as err:  # matplotlib missing: the JSON is the record, the picture is a convenience
        logger.warning("Could not draw the rank heatmap: %s", err)


class FlexLoRATrainerMixin:
    """Adds FlexLoRA to a `Trainer` subclass: wrapping, orthogonality loss, logging, saving and resume.

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
                    "FlexLoRATrainer got a plain model and no flexlora_config: pass flexlora_config=FlexLoRAConfig(...) "
                    "or a model wrapped with get_flexlora_model."
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
        kwargs["callbacks"] = callbacks
        self._orth_sum = 0.0
        self._orth_count = 0
        super().__init__(*args, **kwargs)
        targs = self.args  # type: ignore[attr-defined]
        if targs.ddp_find_unused_parameters is None and not targs.gradient_checkpointing:
            # Trainer defaults to True for non-PreTrainedModel wrappers; every adapter slot is in the graph (masked
            # slots too), so the extra autograd traversal is pure cost.
            targs.ddp_find_unused_parameters = False

    @property
    def flexlora_model(self) -> FlexLoRAModel:
        return unwrap_flexlora(self.model)  # type: ignore[attr-defined]

    # -------------------------------------------------------------- optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        # Capacity must be final before the optimizer holds the parameters (it may replace slot tensors).
        fm = self.flexlora_model
        if not fm.capacity_final or fm.flexlora_config.total_steps is None:
            fm.finalize_capacity(self.state.max_steps)  # type: ignore[attr-defined]
        return super().create_optimizer(model)  # type: ignore[misc]

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)  # type: ignore[misc]
        return [n for n in names if "lora_lam" not in n]

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
        self._orth_sum += float(reg.detach())
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
            if self._orth_count:
                logs["orth_reg"] = round(self._orth_sum / self._orth_count, 6)
                self._orth_sum, self._orth_count = 0.0, 0
            assert self.flexlora_callback is not None
            logs.update(self.flexlora_callback.pending_logs)
            self.flexlora_callback.pending_logs = {}
            logs["flexlora/total_rank"] = float(self.flexlora_model.total_rank())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # -------------------------------------------------------------- saving / resume
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        from .serialization import load_adapter_into

        if not os.path.isfile(os.path.join(resume_from_checkpoint, "flexlora_config.json")):
            raise ValueError(f"{resume_from_checkpoint} is not a FlexLoRA checkpoint (no flexlora_config.json).")
        load_adapter_into(self.flexlora_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if best is None:
            return
        logger.info("Loading best FlexLoRA adapter from %s (score: %s).", best, self.state.best_metric)  # type: ignore[attr-defined]
        self._load_from_checkpoint(best)

    # -------------------------------------------------------------- Hub
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Publish the adapter folder with the FlexLoRA model card (not transformers' generic card).

        The repo is `args.hub_model_id` (a bare name is put in the token owner's namespace) or the output dir's name.
        The card gets the training arguments and the latest `eval_*` metrics. Only the main process uploads.
        Extra keyword arguments accepted by `build_model_card` (`datasets`, `metrics`, `pipeline_tag`,
        `base_model`) are forwarded to it; others are ignored like Trainer's card arguments.
        """
        from huggingface_hub import HfApi

        args = self.args  # type: ignore[attr-defined]
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return None
        token = token or args.hub_token
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        if "/" not in repo_id:
            repo_id = f"{HfApi(token=token).whoami()['name']}/{repo_id}"
        self.save_model(_internal_call=True)  # type: ignore[attr-defined]
        evals = {}
        for entry in self.state.log_history:  # type: ignore[attr-defined]
            evals.update({k[len("eval_") :]: v for k, v in entry.items() if k.startswith("eval_")})
        card: dict[str, Any] = {k: kwargs[k] for k in ("datasets", "metrics", "pipeline_tag", "base_model") if k in kwargs}
        card.update(training_args=args, eval_results=evals or None)
        return self.flexlora_model.push_to_hub(
            repo_id,
            token=token,
            private=private if private is not None else args.hub_private_repo,
            commit_message=commit_message,
            revision=revision or args.hub_revision,
            model_card_kwargs=card,
        )

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
