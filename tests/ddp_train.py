"""Worker for test_ddp.py: a 2-process CPU (gloo) FlexLoRATrainer run; each rank dumps its rank map and adapter."""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from helpers import lm_dataset, trainer_llama, training_args  # noqa: E402

from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer  # noqa: E402


def main(out_dir: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    cfg = FlexLoRAConfig(r=4, lora_alpha=8, b0=2, t_warmup=2, t_final=2, delta_t=2, schedule="constant")
    args = training_args(
        os.path.join(out_dir, "run"), per_device_train_batch_size=4, max_steps=10, ddp_backend="gloo"
    )
    trainer = FlexLoRATrainer(model=trainer_llama(), args=args, train_dataset=lm_dataset(), flexlora_config=cfg)
    trainer.train()
    fm = trainer.flexlora_model
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tensors = {}
    for name, layer in fm.flexlora_layers():
        for key, value in layer.compact().items():
            tensors[f"{name}.{key}"] = value.contiguous()
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "ranks": fm.rank_map(), "events": len(fm.rank_history)}, f)


if __name__ == "__main__":
    main(sys.argv[1])
