"""Worker for test_ddp.py: a 2-process CPU (gloo) FlexLoRATrainer run; each rank dumps its rank map and adapter."""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from helpers import lm_dataset, trainer_llama, training_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer
from flexlora_hf.functional import plan_reallocation


class Disagree(TrainerCallback):
    """On process 1 only, just before the event after step 4: make two modules' λ rank-1 (entropy 0), so a plan
    made from process 1's own numbers would prune them; records that local plan."""

    def __init__(self) -> None:
        self.local_plan: dict | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):  # runs before FlexLoRACallback's
        if state.global_step != 4 or int(os.environ.get("RANK", "0")) != 1:
            return
        fm = model.module if hasattr(model, "module") else model
        with torch.no_grad():
            for _, layer in list(fm.flexlora_layers())[:2]:
                layer.lora_lam[: layer.rank] = 0.0
                layer.lora_lam[0] = 1.0
        plan = plan_reallocation(fm.importance_scores(), fm.rank_map(), 2, max_rank=fm.rank_caps())
        self.local_plan = {"prune": list(plan.prune), "expand": list(plan.expand)}


def main(out_dir: str, mode: str = "plain") -> None:
    rank = int(os.environ.get("RANK", "0"))
    cfg = FlexLoRAConfig(
        r=4, lora_alpha=8, b0=2, t_warmup=2, t_final=2, delta_t=2, schedule="constant",
    )  # fmt: skip
    args = training_args(
        os.path.join(out_dir, "run"), per_device_train_batch_size=4, max_steps=10, ddp_backend="gloo"
    )
    disagree = Disagree() if mode == "disagree" else None
    trainer = FlexLoRATrainer(
        model=trainer_llama(), args=args, train_dataset=lm_dataset(), flexlora_config=cfg,
        callbacks=[disagree] if disagree else None,
    )
    trainer.train()
    assert args.ddp_find_unused_parameters is None  # the user's arguments are never modified
    ddp = trainer.model_wrapped
    find_unused = getattr(ddp, "find_unused_parameters", None)  # read from the wrapped DDP module itself
    fm = trainer.flexlora_model
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tensors = {}
    for name, layer in fm.flexlora_layers():
        for key, value in layer.compact().items():
            tensors[f"{name}.{key}"] = value.contiguous()
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "world": world,
                "ranks": fm.rank_map(),
                "events": len(fm.rank_history),
                "ddp": type(ddp).__name__,
                "find_unused_parameters": find_unused,
                "history": [{"step": e["step"], "prune": e["prune"], "expand": e["expand"]} for e in fm.rank_history],
                "local_plan": disagree.local_plan if disagree else None,
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
