"""Restarts of a `FlexLoRATrainer` run: `resume_from_checkpoint`, the best-model reload of `load_best_model_at_end`,
and a second `train()` on the same Trainer.

Owns [`TrainerRestartMixin`] (a base of `FlexLoRATrainerMixin`) and [`keep_checkpoint_schedule`]. What can go wrong
here, silently, is an optimizer that no longer holds the tensors the model uses, so that training updates nothing:

* Loading a checkpoint writes its values into the existing Parameters when the capacity is the same
  (`io.native.restore`), so an optimizer keeps holding them; a checkpoint of another capacity replaces them.
* A `train()` after another one builds a new optimizer (and the Trainer a new scheduler) when this Trainer built the
  previous one, so a replaced Parameter is always picked up; with `resume_from_checkpoint` it then loads the
  checkpoint's `optimizer.pt`, exactly as in a new Trainer. An optimizer passed in `optimizers=(...)` is kept, and
  `optim.surgery.check_optimizer_holds_adapter` refuses it at train start if it went stale.
* Resuming keeps the checkpoint's schedule (its `total_steps`), which its slot capacity and optimizer moments were
  sized for, whatever `max_steps` the new run has.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter.targets import resolve_capacity
from ..constants import CONFIG_NAME
from ..optim.surgery import unwrap_optimizer

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)


def keep_checkpoint_schedule(fm: FlexLoRAModel, saved_total_steps: int | None, checkpoint: str) -> None:
    """On resume, keep the schedule the checkpoint's slots and optimizer state were sized for.

    A config without `total_steps` takes the checkpoint's (its run's length): deriving it from a new `max_steps`
    would change the number of events, hence the slot capacity, while `optimizer.pt` holds moments of the
    checkpoint's shapes. An explicit `total_steps` that needs more slots than the checkpoint has is refused.

    Raises:
        ValueError: the config's `total_steps` needs more rank slots than the checkpoint holds.
    """
    cfg = fm.flexlora_config
    if cfg.total_steps is None and saved_total_steps is not None:
        cfg.total_steps = saved_total_steps
        logger.info(
            "FlexLoRA: resuming from %s with the checkpoint's schedule (total_steps=%d; FlexLoRAConfig.total_steps "
            "was unset).",
            checkpoint,
            saved_total_steps,
        )
    if cfg.total_steps is None:
        return
    for name, layer in fm.flexlora_layers():
        need = resolve_capacity(cfg, name, layer.in_features, layer.out_features)
        if need > layer.capacity:
            raise ValueError(
                f"Cannot resume from {checkpoint}: FlexLoRAConfig.total_steps={cfg.total_steps} schedules more "
                f"reallocation events than the checkpoint (total_steps={saved_total_steps}) has rank slots for "
                f"({name}: {need} > {layer.capacity}), and its optimizer state has the checkpoint's shapes. Resume "
                f"with the checkpoint's schedule: leave total_steps unset or set it to {saved_total_steps} (max_steps "
                "may still differ: training continues past it with the same events)."
            )


class TrainerRestartMixin:
    """Resume, best-model reload and repeated `train()` for `FlexLoRATrainerMixin` (see the module docstring)."""

    # The optimizer this Trainer built (`FlexLoRATrainerMixin.create_optimizer` sets it); None: none yet, or the
    # caller's from optimizers=(...), which is never replaced.
    _own_optimizer: torch.optim.Optimizer | None = None
    optimizer: Any  # Trainer's

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`. A call after another one builds a new optimizer (and scheduler) when this Trainer built
        the previous one; with `resume_from_checkpoint` it then gets the checkpoint's state, as in a new Trainer.

        Why not keep the old one as `Trainer` does: a checkpoint or best-model reload may have replaced the adapter's
        Parameters (another capacity), and the per-direction Adam correction counts a direction's age in this run's
        optimizer steps. An optimizer passed in `optimizers=(...)` is kept; the guard at train start refuses it if it
        no longer holds the adapter.
        """
        current = getattr(self, "optimizer", None)
        own = self._own_optimizer
        if current is not None and own is not None and unwrap_optimizer(current) is own and own.state:
            self.optimizer = None  # the Trainer drops the scheduler it created itself (`_created_lr_scheduler`)
            self._own_optimizer = None
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        saved_total_steps = self._restore_adapter(resume_from_checkpoint)
        keep_checkpoint_schedule(self.flexlora_model, saved_total_steps, resume_from_checkpoint)  # type: ignore[attr-defined]

    def _restore_adapter(self, checkpoint: str) -> int | None:
        """Load a checkpoint's adapter into the model (in place at the same capacity); returns its `total_steps`."""
        from ..io.native import load_adapter_into

        if not os.path.isfile(os.path.join(checkpoint, CONFIG_NAME)):
            raise ValueError(f"{checkpoint} is not a FlexLoRA checkpoint (no flexlora_config.json).")
        return load_adapter_into(self.flexlora_model, checkpoint).config.total_steps  # type: ignore[attr-defined]

    def _load_best_model(self) -> None:
        state = self.state  # type: ignore[attr-defined]
        best = state.best_model_checkpoint
        if best is None:
            return
        logger.info("Loading best FlexLoRA adapter from %s (score: %s).", best, state.best_metric)
        fm = self.flexlora_model  # type: ignore[attr-defined]
        history = list(fm.rank_history)  # the checkpoint's history stops at its step: keep every event of the run
        self._restore_adapter(best)
        fm.rank_history = history + [
            {
                "step": state.global_step,
                "budget": 0,
                "prune": [],
                "expand": [],
                "scores": {},
                "ranks": fm.rank_map(),
                "loaded_best_model_checkpoint": best,
            }
        ]
