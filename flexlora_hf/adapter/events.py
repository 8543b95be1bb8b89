"""One reallocation event: score -> plan -> apply -> optimizer reset -> history record. The only place that does it.

Used by `FlexLoRACallback` (Trainer), `FlexLoRAModel.update_and_allocate` (custom accelerate / PyTorch loops), the
benchmarks and the tests, so every caller makes the same decisions and writes the same history schema:

    {"step": t, "budget": b(t), "prune": [...], "expand": [...], "scores": {module: importance}, "ranks": {...},
     "motion": {"moved": ..., "moved_share": ..., "churn": ...}}   # cumulative up to this event (`rank_motion`)

Imports torch only; the model is duck-typed (it is built in `model.py`, which imports this module).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..config import FlexLoRAConfig
from ..functional.allocation import ReallocationPlan, plan_reallocation
from ..functional.schedule import budget_at, event_steps, is_event_step
from ..functional.scoring import random_scores

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
    if cfg.importance == "random":  # the control: chance instead of the spectrum
        scores = random_scores(model.module_names, cfg.seed, step)
    else:
        scores = model.importance_scores()
    protected = recently_expanded(model.rank_history, cfg.grace_events)
    plan = plan_reallocation(
        scores,
        model.rank_map(),
        b,
        max_rank=model.rank_caps(),
        allocation=cfg.allocation,
        protected=protected,
    )
    plan = agree_across_processes(plan)
    if b > 0 and not plan and len(set(scores.values())) <= 1:
        logger.info("FlexLoRA event at step %d: every importance score is %s; nothing to choose by, no rank moved.",
                    step, next(iter(scores.values()), 0.0))
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
    record["motion"] = rank_motion(model.rank_history, sum(record["ranks"].values()))  # cumulative, up to this event
    logger.info(
        "FlexLoRA event at step %d: b=%d, pruned %d, expanded %d, total rank %d, moved so far %.1f%% of it",
        step,
        b,
        len(record["prune"]),
        len(record["expand"]),
        sum(record["ranks"].values()),
        100 * record["motion"]["moved_share"],
    )
    return record


def recently_expanded(history: list[dict[str, Any]], grace_events: int) -> set[str]:
    """Modules that gained a direction in the last `grace_events` events of `history` (not pruned now)."""
    if grace_events <= 0:
        return set()
    return {name for record in history[-grace_events:] for name in record["expand"]}


def rank_motion(history: list[dict[str, Any]], total_rank: int) -> dict[str, float]:
    """How much rank the events moved, as the run reports it at its end.

    `moved` counts rank units that changed matrix (one per prune/expand pair; one per move for the one-sided
    ablations), `moved_share` divides by the total rank budget, and `churn` is the share of expansions whose matrix
    was pruned at the very next event (what `grace_events` prevents).
    """
    moved = sum(max(len(r["prune"]), len(r["expand"])) for r in history)
    expansions = sum(len(r["expand"]) for r in history[:-1])
    churned = sum(len(set(a["expand"]) & set(b["prune"])) for a, b in zip(history, history[1:], strict=False))
    return {
        "moved": float(moved),
        "moved_share": moved / max(total_rank, 1),
        "churn": churned / expansions if expansions else 0.0,
    }


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
    if not is_event_step(global_step, **cfg.grid_kwargs()):
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
        "flexlora/moved_share": float(record.get("motion", {}).get("moved_share", 0.0)),
        "flexlora/churn": float(record.get("motion", {}).get("churn", 0.0)),
    }


def validate_schedule(cfg: FlexLoRAConfig, n_modules: int) -> None:
    """Fail at train start (not mid-run) when the schedule can never fire or the budget cannot fit."""
    cfg.validate(n_modules=n_modules)
    steps = cfg.steps()
    if cfg.b0 > 0 and not event_steps(**cfg.grid_kwargs()):
        raise ValueError(
            f"FlexLoRA schedule has no event: no multiple of delta_t={steps['delta_t']} "
            f"in (t_warmup={steps['t_warmup']}, "
            f"total_steps - t_final={int(cfg.total_steps or 0) - steps['t_final']}] with b(t) > 0. "
            "Lower delta_t, t_warmup or t_final, or train for more steps (set b0=0 to train a fixed-rank adapter on "
            "purpose)."
        )
