"""One reallocation event: score -> plan -> apply -> optimizer reset -> history record. The only place that does it.

Used by `FlexLoRACallback` (Trainer), `FlexLoRAModel.update_and_allocate` (custom accelerate / PyTorch loops), the
benchmarks and the tests, so every caller makes the same decisions and writes the same history schema:

    {"step": t, "budget": b(t), "prune": [...], "expand": [...], "scores": {module: importance}, "ranks": {...}}

Imports torch only; the model is duck-typed (it is built in `model.py`, which imports this module).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .allocation import ReallocationPlan, plan_reallocation
from .config import FlexLoRAConfig
from .schedule import budget_at, event_steps, is_event_step

if TYPE_CHECKING:
    from .model import FlexLoRAModel

logger = logging.getLogger(__name__)


def run_event(model: FlexLoRAModel, b: int, step: int, optimizer: Any = None) -> dict[str, Any]:
    """Score, plan and apply one event with budget `b` after optimizer step `step`; append and return its record.

    Args:
        model (`FlexLoRAModel`): the adapted model.
        b (`int`): directions to prune and to expand (b(t) of eq. 4, or any budget for experiments).
        step (`int`): the optimizer step; seeds the draw of new directions.
        optimizer (*optional*): the training optimizer; the moments of touched slots are reset in place.
    """
    cfg = model.flexlora_config
    scores = model.importance_scores()
    plan = plan_reallocation(
        scores, model.rank_map(), b, min_rank=cfg.min_rank, max_rank=model.rank_caps(), allocation=cfg.allocation
    )
    plan = agree_across_processes(plan)
    model.apply_plan(plan, optimizer, step=step)
    record: dict[str, Any] = {
        "step": step,
        "budget": b,
        "prune": list(plan.prune),
        "expand": list(plan.expand),
        "scores": scores,
        "ranks": model.rank_map(),
    }
    model.rank_history.append(record)
    logger.info(
        "FlexLoRA event at step %d: b=%d, pruned %d, expanded %d, total rank %d",
        step,
        b,
        len(record["prune"]),
        len(record["expand"]),
        sum(record["ranks"].values()),
    )
    return record


def agree_across_processes(plan: ReallocationPlan) -> ReallocationPlan:
    """In a multi-process run, every process applies the plan of process 0 (a no-op on one process).

    Each process computes its scores from its own float sums; a last-bit difference could split the plans while the
    processes keep training "together" (DDP would even broadcast buffers from process 0), a silent divergence. Rank 0
    decides and broadcasts (one small collective per event; events are rare). Needs the default process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    box: list[Any] = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def update_and_allocate(model: FlexLoRAModel, global_step: int, optimizer: Any = None) -> dict[str, Any] | None:
    """Run the event scheduled after optimizer step `global_step` (1-based), if any; return its record or `None`."""
    cfg = model.flexlora_config
    if cfg.total_steps is None:
        raise ValueError(
            "update_and_allocate needs the run's length: set FlexLoRAConfig.total_steps (or call "
            "model.finalize_capacity(total_steps) before building the optimizer)."
        )
    if not is_event_step(global_step, delta_t=cfg.delta_t, **cfg.schedule_kwargs()):
        return None
    return run_event(model, budget_at(global_step, **cfg.schedule_kwargs()), global_step, optimizer)


def event_logs(record: dict[str, Any]) -> dict[str, float]:
    """The metrics one event reports through the Trainer's `report_to` (`flexlora/*`)."""
    scores = record["scores"]
    return {
        "flexlora/total_rank": float(sum(record["ranks"].values())),
        "flexlora/mean_importance": float(sum(scores.values()) / max(len(scores), 1)),
        "flexlora/moves": float(len(record["prune"]) + len(record["expand"])),
        "flexlora/budget": float(record["budget"]),
    }


def validate_schedule(cfg: FlexLoRAConfig, n_modules: int) -> None:
    """Fail at train start (not mid-run) when the schedule can never fire or the budget cannot fit."""
    cfg.validate(n_modules=n_modules)
    if cfg.b0 > 0 and not event_steps(delta_t=cfg.delta_t, **cfg.schedule_kwargs()):
        raise ValueError(
            f"FlexLoRA schedule has no event: no multiple of delta_t={cfg.delta_t} in (t_warmup={cfg.t_warmup}, "
            f"total_steps - t_final={cfg.total_steps - cfg.t_final if cfg.total_steps else '?'}] with b(t) > 0. "
            "Lower delta_t, t_warmup or t_final, or train for more steps (set b0=0 to train a fixed-rank adapter on "
            "purpose)."
        )
