"""Worker for test_fsdp2.py: FlexLoRA under FSDP2 (`fully_shard`, gloo, CPU, 2 processes) in a custom loop.

Every process trains the same tiny Llama twice, in float64: once unsharded on the whole global batch (the reference),
once with every decoder block and the root sharded by `fully_shard`, each process on its half of the batch (FSDP
averages the gradients, so the two runs take the same steps). Events happen during training, including ones that
activate and move slots held by process 1's shard of λ and Q. Each process dumps what it saw as JSON: the rank
histories, the largest differences from the reference in P, λ, Q and their AdamW moments, and (mode "resume") the
same for a run interrupted, saved (adapter folder + DCP optimizer state) and resumed on fresh objects.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_llama  # noqa: E402

from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, get_flexlora_model  # noqa: E402
from flexlora_hf.distributed.sharding import full_tensor  # noqa: E402
from flexlora_hf.optim.surgery import param_groups  # noqa: E402

STEPS, RESUME_AT, LR = 12, 7, 5e-3
GLOBAL_BATCH, LENGTH = 4, 12


def config(basis: str = "orthonormal") -> FlexLoRAConfig:
    return FlexLoRAConfig(
        init_basis=basis,
        r=2, lora_alpha=4, b0=2, t_warmup=2, t_final=2, delta_t=2, schedule="constant", total_steps=STEPS,
        target_modules=["q_proj", "v_proj", "down_proj"], max_rank=5, orth_reg_weight=0.1, modules_to_save=["lm_head"],
        grace_events=0,  # boundary (test_fsdp2): a module grows to 4 directions and is pruned (rotated) the next event
    )


def build(basis: str = "orthonormal") -> FlexLoRAModel:
    fm = get_flexlora_model(tiny_llama(eval_mode=False, vocab_size=64), config(basis))
    return fm.double().train()


def shard(fm: FlexLoRAModel) -> FlexLoRAModel:
    from torch.distributed.fsdp import fully_shard

    for block in fm.base_model.model.layers:
        fully_shard(block)
    fully_shard(fm)
    return fm


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (GLOBAL_BATCH, LENGTH), generator=g)  # (B, T)


def optimizer(fm: FlexLoRAModel) -> torch.optim.Optimizer:
    # eps 1e-3: at the default 1e-8, gradients of ~1e-8 (young directions) let Adam amplify the last-bit differences
    # of FSDP's reduction order to ~1e-9 after 12 steps; with it the two runs agree to rounding (~1e-16).
    groups = param_groups(fm, LR, 0.01)
    groups[-1]["lr"] = 10 * LR  # λ's group at 10x: the trajectory whose events cross the shard boundary (test_fsdp2)
    return torch.optim.AdamW(groups, lr=LR, eps=1e-3)


def train(fm: FlexLoRAModel, opt: Any, steps: range, parts: list[slice]) -> list[float]:
    """Custom loop; the loss is the mean of the loss of each part of the batch (the reference takes every
    process's part, so its sums group as FSDP's gradient average does)."""
    gamma = fm.flexlora_config.orth_reg_weight
    orth = []
    for step in steps:
        loss = sum(fm(input_ids=batch(step)[rows], labels=batch(step)[rows]).loss for rows in parts) / len(parts)
        reg = fm.orth_reg()
        orth.append(float(reg.detach()))
        (loss + gamma * reg).backward()
        opt.step()
        opt.zero_grad()
        fm.update_and_allocate(step, opt)
    return orth


def snapshot(fm: FlexLoRAModel, opt: Any) -> dict[str, torch.Tensor]:
    """Every adapter tensor and its AdamW moments, whole (gathered from the shards: a collective)."""
    out = {}
    for name, layer in fm.flexlora_layers():
        for pname in ("lora_P", "lora_lam", "lora_Q"):
            p = getattr(layer, pname)
            out[f"{name}.{pname}"] = full_tensor(p.detach()).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{pname}.{key}"] = full_tensor(opt.state[p][key]).clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a}


def events(fm: FlexLoRAModel) -> list[dict[str, Any]]:
    return [{k: e[k] for k in ("step", "prune", "expand", "ranks")} for e in fm.rank_history]


def main(out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float64)  # adapters are created (and reloaded) in the default dtype
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [slice(r * GLOBAL_BATCH // world, (r + 1) * GLOBAL_BATCH // world) for r in range(world)]
    result: dict[str, Any] = {"world": world}

    basis = "lora_like" if mode == "lora_like" else "orthonormal"  # lora_like: pruning reads P's, Q's norms
    ref = build(basis)
    ref_opt = optimizer(ref)
    result["ref_orth"] = train(ref, ref_opt, range(1, STEPS + 1), parts)
    ref_state = snapshot(ref, ref_opt)
    result["ref_events"] = events(ref)
    ref.save_pretrained(os.path.join(out_dir, "ref")) if rank == 0 else None

    fm = shard(build(basis))
    layer0 = next(layer for _, layer in fm.flexlora_layers())
    result["placements"] = [str(p) for p in layer0.lora_Q.placements]
    result["local_slots"] = int(layer0.lora_Q.to_local().shape[0])
    opt = optimizer(fm)
    if mode in ("plain", "lora_like"):
        result["orth"] = train(fm, opt, range(1, STEPS + 1), [parts[rank]])
        result["orth_in_forward"] = layer0.orth_in_forward
    else:  # interrupted at RESUME_AT, saved, rebuilt from the folder and the DCP optimizer state, resumed
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        train(fm, opt, range(1, RESUME_AT + 1), [parts[rank]])
        ckpt = os.path.join(out_dir, "ckpt")
        fm.save_pretrained(os.path.join(ckpt, "adapter"))
        dcp.save({"optim": get_optimizer_state_dict(fm, opt)}, checkpoint_id=os.path.join(ckpt, "optim"))
        dist.barrier()
        del fm, opt
        fm = FlexLoRAModel.from_pretrained(tiny_llama(eval_mode=False, vocab_size=64), os.path.join(ckpt, "adapter"), is_trainable=True)
        fm = shard(fm.double().train())
        opt = optimizer(fm)
        state = {"optim": get_optimizer_state_dict(fm, opt)}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "optim"))
        set_optimizer_state_dict(fm, opt, state["optim"])
        fm.attach_optimizer(opt, RESUME_AT)  # the directions still young get their own Adam correction again
        train(fm, opt, range(RESUME_AT + 1, STEPS + 1), [parts[rank]])
    result["events"] = events(fm)
    result["diff"] = max_diff(snapshot(fm, opt), ref_state)
    result["caps"] = fm.rank_caps()
    fm.save_pretrained(os.path.join(out_dir, "fsdp"))  # every process calls it; process 0 writes
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # both results are on disk before either process tears gloo down
    dist.destroy_process_group()
    # Skip interpreter finalization, where gloo's worker threads can abort the process (a known teardown race,
    # pytorch/pytorch#179291): the results are written and the group is destroyed, nothing is left to run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "plain")
