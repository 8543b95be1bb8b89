"""Inference cost: merged FlexLoRA vs the base model, unmerged FlexLoRA vs unmerged PEFT LoRA.

Usage::

    python -m benchmarks.inference --model smollm2 --output benchmarks/results/inference_smollm2.json

Variants (each its own deep copy of the same base model, all in one process, timed round-robin):

* ``base``: the plain transformers model.
* ``flexlora_merged``: FlexLoRA r = 8 with random (non-zero) λ, then `merge_and_unload()`: a plain model again, so
  its forward must cost exactly what the base costs.
* ``flexlora_unmerged``: the adapter kept separate with ``r`` slots (what loading a saved adapter whose active
  slots are 0..r-1 gives).
* ``flexlora_unmerged_slots``: the same with ``r + capacity_extra`` slots, as during training (the forward computes
  over every slot; inactive ones are multiplied by 0).
* ``lora_unmerged``: PEFT LoRA r = 8 with random B; ``lora_merged``: the same after PEFT's `merge_and_unload()`.

We also check that merging does not change the outputs (max |logit difference|, merged vs unmerged).
Reported: per-repeat mean forward time (``torch.no_grad``, eval mode), median and IQR over repeats, wall and CPU
time, and ratios to ``base`` and to ``lora_unmerged`` computed within each repeat.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .common import (
    DTYPES,
    AdapterSpec,
    load_causal_lm,
    machine_info,
    offline_env,
    pick_device,
    random_batch,
    rotated,
    setup_logging,
    summarize,
    synchronize,
    write_json,
)

logger = logging.getLogger("benchmarks.inference")

DEFAULTS = {
    "tiny": {"batch_size": 4, "seq_len": 64},
    "smollm2": {"batch_size": 4, "seq_len": 128},
    "smollm2-random": {"batch_size": 4, "seq_len": 128},
}
VARIANTS = (
    "base",
    "flexlora_merged",
    "flexlora_unmerged",
    "flexlora_unmerged_slots",
    "lora_unmerged",
    "lora_merged",
)


def _flexlora(base: nn.Module, spec: AdapterSpec, slots: int, seed: int) -> Any:
    from flexlora_hf import FlexLoRAConfig, get_flexlora_model

    cfg = FlexLoRAConfig(
        r=spec.r, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules), max_rank=slots, b0=0
    )
    fm = get_flexlora_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in fm.flexlora_layers():
            slots = layer.active_slots()
            layer.lora_lam[slots] = (torch.randn(slots.numel(), generator=gen) * 0.5).to(layer.lora_lam.device)
    return fm


def _lora(base: nn.Module, spec: AdapterSpec, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules))
    torch.manual_seed(seed)  # lora_A is drawn from the global RNG
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))
    return model


def build_variants(base: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, nn.Module]:
    """All variants of `VARIANTS`, each on its own copy of `base` (which itself is the ``base`` variant)."""
    variants: dict[str, nn.Module] = {"base": base}
    variants["flexlora_unmerged"] = _flexlora(base, spec, spec.r, seed)
    variants["flexlora_unmerged_slots"] = _flexlora(base, spec, spec.r + spec.capacity_extra, seed)
    merged = _flexlora(base, spec, spec.r, seed)
    variants["flexlora_merged"] = merged.merge_and_unload()
    variants["lora_unmerged"] = _lora(base, spec, seed)
    variants["lora_merged"] = _lora(base, spec, seed).merge_and_unload()
    for m in variants.values():
        m.eval()
    return variants


@torch.no_grad()
def merge_checks(variants: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    def logits(name: str) -> torch.Tensor:
        return variants[name](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    return {
        "flexlora_merged_vs_unmerged_max_abs": float(
            (logits("flexlora_merged") - logits("flexlora_unmerged")).abs().max()
        ),
        "flexlora_unmerged_vs_slots_max_abs": float(
            (logits("flexlora_unmerged") - logits("flexlora_unmerged_slots")).abs().max()
        ),
        "lora_merged_vs_unmerged_max_abs": float((logits("lora_merged") - logits("lora_unmerged")).abs().max()),
        "flexlora_unmerged_vs_base_max_abs": float((logits("flexlora_unmerged") - logits("base")).abs().max()),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    offline_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    base = load_causal_lm(args.model, device=device, dtype=DTYPES[args.dtype], seed=args.seed)
    spec = AdapterSpec(r=args.r, capacity_extra=args.capacity_extra)
    variants = build_variants(base, spec, args.seed)
    variants = {k: v.to(device) for k, v in variants.items() if k in args.variants}
    batch = random_batch(base.config.vocab_size, args.batch_size, args.seq_len, device=device, seed=args.seed)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    checks = merge_checks(variants, batch) if set(VARIANTS) <= set(variants) else {}
    names = list(variants)
    with torch.no_grad():
        for name in names:  # warm-up
            variants[name](**inputs)
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for k in range(args.repeats):
            for name in rotated(names, k):
                synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.forwards):
                    variants[name](**inputs)
                synchronize(device)
                rows[name].append(
                    {
                        "wall_s": (time.perf_counter() - t0) / args.forwards,
                        "cpu_s": (time.process_time() - c0) / args.forwards,
                    }
                )
            logger.info("repeat %d: %s", k, ", ".join(f"{n} {rows[n][-1]['wall_s']:.4f}s" for n in names))
    timing: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {key: summarize([r[key] for r in rows[name]]) for key in ("wall_s", "cpu_s")}
        for ref in ("base", "lora_unmerged"):
            if ref in rows:
                for key in ("wall_s", "cpu_s"):
                    pairs = zip(rows[name], rows[ref], strict=True)
                    entry[f"{key}_ratio_to_{ref}"] = summarize([a[key] / b[key] for a, b in pairs])
        entry["raw"] = rows[name]
        timing[name] = entry
    result = {
        "benchmark": "inference",
        "config": vars(args),
        "machine": machine_info(device),
        "merge_checks": checks,
        "timing": timing,
    }
    write_json(args.output, result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=tuple(DEFAULTS), default="tiny")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--capacity-extra", type=int, default=21)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--forwards", type=int, default=3, help="Forward passes per variant per repeat.")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def format_table(result: dict[str, Any]) -> str:
    def iqr(d: dict[str, float], scale: float = 1.0, fmt: str = ".3f") -> str:
        return f"{scale * d['median']:{fmt}} [{scale * d['q25']:{fmt}}, {scale * d['q75']:{fmt}}]"

    lines = [
        "| variant | wall ms/forward | CPU ms/forward | CPU ratio to base | CPU ratio to PEFT LoRA (unmerged) |",
        "|---|---|---|---|---|",
    ]
    for name, t in result["timing"].items():
        lines.append(
            f"| {name} | {iqr(t['wall_s'], 1e3, '.1f')} | {iqr(t['cpu_s'], 1e3, '.1f')} | "
            + (iqr(t["cpu_s_ratio_to_base"]) if "cpu_s_ratio_to_base" in t else "-")
            + " | "
            + (iqr(t["cpu_s_ratio_to_lora_unmerged"]) if "cpu_s_ratio_to_lora_unmerged" in t else "-")
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    result = run(argv)
    print(format_table(result))
    print({k: f"{v:.3g}" for k, v in result["merge_checks"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
