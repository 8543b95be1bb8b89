"""Cost of one FlexLoRA reallocation event at LLaMA3-8B adapter shapes.

Usage::

    python -m benchmarks.run event_cost                   # the study: benchmarks/studies/event_cost.toml
    python -m benchmarks.event_cost --output OUT.json     # any other arguments

What is built: a module tree shaped like LLaMA3-8B (32 layers; q 4096->4096, k and v 4096->1024 (GQA, 8 KV heads),
up 4096->14336, down 14336->4096; hidden 4096, intermediate 14336) whose linear layers are *shape-only*
`nn.Linear` subclasses without weights, wrapped by the real `get_flexlora_model` on those five targets (160
matrices) with ``r`` active directions and ``r + capacity_extra`` slots each (21 extra by default: the Δ_T grid
points of the paper's commonsense schedule, an upper bound on the events). Only the adapter tensors exist
(``1,769,472 x slots`` floats: 205 MB at r = 8, 375 MB at r = 32). λ and the active P columns are filled with random values (a trained-looking
spectrum), every adapter tensor gets a random gradient and one real `torch.optim.AdamW` step creates the state
(exp_avg, exp_avg_sq) that the event's surgery resets.

What is timed (median over ``--repeats`` events, each a real `flexlora_hf.adapter.events.run_event` with budget b0 = 4):
importance of all 160 matrices, the plan, 4 prunes + 4 expansions and the in-place AdamW state reset; plus a
breakdown (importance / rank and cap maps / plan / apply_plan with surgery) and the per-step orthogonality term
(forward + backward), which FlexLoRA pays every step.

Fraction of a training step: no GPU was available, so the LLaMA3-8B step time is *estimated*, two ways, both stated
in the output: (a) from the paper's own Table 13 (LoRA 4.76 h for 3 epochs of Commonsense170K at batch 16, i.e.
about 31,956 steps -> 0.536 s/step), and (b) from FLOPs: a LoRA step with a frozen base costs about 4·N·tokens
(forward 2N, activation gradients 2N, no base weight gradients) = 4 x 8.03e9 x (16 x 256) = 1.3e14 FLOPs, which at
an assumed 40 % MFU of an A100's 312 bf16 TFLOP/s takes 1.06 s. We divide by the *smaller* (a), so the fraction is
an upper bound; events happen every Δ_T = 1000 steps, so the amortised per-step share is that fraction / 1000.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .common import (
    machine_info,
    offline_env,
    pick_device,
    provenance,
    setup_logging,
    summarize,
    synchronize,
    write_json,
)

logger = logging.getLogger("benchmarks.event_cost")

LLAMA3_8B = {"layers": 32, "hidden": 4096, "intermediate": 14336, "kv_out": 1024, "params": 8.03e9}
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

# Step-time estimates (see the module docstring).
PAPER_LORA_HOURS = 4.76  # Table 13, LoRA, LLaMA3-8B, 3 epochs of Commonsense170K
COMMONSENSE_ROWS = 170_420
BATCH, EPOCHS, SEQ = 16, 3, 256
PAPER_STEPS = EPOCHS * math.ceil(COMMONSENSE_ROWS / BATCH)
A100_BF16_FLOPS, MFU = 312e12, 0.40
DELTA_T = 1000


class ShapeOnlyLinear(nn.Linear):
    """An `nn.Linear` with shapes but no weight: lets `FlexLoRALayer` wrap an 8B-shaped layer for free."""

    def __init__(self, in_features: int, out_features: int) -> None:  # noqa: D107 -- no super().__init__ on purpose
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("ShapeOnlyLinear has no weight; it only gives FlexLoRALayer its shape.")


def llama3_8b_skeleton() -> nn.Module:
    """Module tree with LLaMA3-8B's projection shapes (all seven per layer; the benchmark targets five)."""
    h, i, kv = LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"], LLAMA3_8B["kv_out"]

    def layer() -> nn.Module:
        attn = nn.Module()
        attn.q_proj, attn.k_proj = ShapeOnlyLinear(h, h), ShapeOnlyLinear(h, kv)
        attn.v_proj, attn.o_proj = ShapeOnlyLinear(h, kv), ShapeOnlyLinear(h, h)
        mlp = nn.Module()
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = ShapeOnlyLinear(h, i), ShapeOnlyLinear(h, i), ShapeOnlyLinear(i, h)
        block = nn.Module()
        block.self_attn, block.mlp = attn, mlp
        return block

    root = nn.Module()
    root.layers = nn.ModuleList([layer() for _ in range(int(LLAMA3_8B["layers"]))])
    return root


def build(r: int, capacity_extra: int, device: torch.device, seed: int = 0) -> tuple[Any, torch.optim.Optimizer]:
    """FlexLoRA over the 8B skeleton, a trained-looking λ and a real AdamW state."""
    from flexlora_hf import FlexLoRAConfig, get_flexlora_model

    cfg = FlexLoRAConfig(
        r=r,
        lora_alpha=16,
        target_modules=list(TARGETS),
        b0=4,
        t_warmup=5000,
        t_final=5000,
        delta_t=DELTA_T,
        total_steps=PAPER_STEPS,
        max_rank=r + capacity_extra,
        seed=seed,
    )
    fm = get_flexlora_model(llama3_8b_skeleton(), cfg).to(device)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in fm.parameters() if p.requires_grad]
    with torch.no_grad():
        for _, layer in fm.flexlora_layers():
            lam = torch.randn(layer.capacity, generator=gen) * 0.05  # varied spectra -> varied importance
            layer.lora_lam.copy_(lam.to(device) * layer.lora_active)
            r = layer.rank  # P = 0 at a lora_like start: give P trained-looking columns so ΔW has a spectrum
            layer.lora_P[:, :r] += (torch.randn(layer.out_features, r, generator=gen) * 0.02).to(device)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device) * (p != 0)
    opt = torch.optim.AdamW(params, lr=3e-4)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return fm, opt


_CPU_TIMES: list[float] = []  # process CPU time of the last `_timed` call (appended), read by `measure`


def _timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    """Run `fn`; return its result and wall seconds (its CPU seconds go to `_CPU_TIMES`)."""
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    _CPU_TIMES.append(time.process_time() - c0)
    return out, time.perf_counter() - t0


def measure(r: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from flexlora_hf.adapter.events import run_event
    from flexlora_hf.functional.allocation import plan_reallocation

    t0 = time.perf_counter()
    fm, opt = build(r, args.capacity_extra, device, seed=args.seed)
    build_s = time.perf_counter() - t0
    n_adapter = sum(p.numel() for p in fm.parameters() if p.requires_grad)
    cfg = fm.flexlora_config
    logger.info(
        "r=%d: %d matrices, %.1fM adapter floats (%d slots each), built in %.1f s",
        r,
        len(fm.module_names),
        n_adapter / 1e6,
        r + args.capacity_extra,
        build_s,
    )
    step = cfg.steps()["t_warmup"]
    for _ in range(args.warmup):
        step += DELTA_T
        run_event(fm, cfg.b0, step, opt)
    events: list[float] = []
    events_cpu: list[float] = []
    parts: dict[str, list[float]] = {"importance": [], "maps": [], "plan": [], "apply_plan": []}
    parts_cpu: dict[str, list[float]] = {k: [] for k in parts}
    for k in range(args.repeats):
        step += DELTA_T
        if k % 2 == 0:  # alternate: the whole library call, then the same work piece by piece
            _, s = _timed(lambda step=step: run_event(fm, cfg.b0, step, opt), device)
            events.append(s)
            events_cpu.append(_CPU_TIMES[-1])
            continue
        scores, s_imp = _timed(fm.importance_scores, device)
        (ranks, caps), s_maps = _timed(lambda: (fm.rank_map(), fm.rank_caps()), device)
        plan, s_plan = _timed(
            lambda scores=scores, ranks=ranks, caps=caps: plan_reallocation(
                scores, ranks, cfg.b0, max_rank=caps, allocation=cfg.allocation
            ),
            device,
        )
        _, s_apply = _timed(lambda plan=plan, step=step: fm.apply_plan(plan, opt, step=step), device)
        for key, val, cpu in zip(parts, (s_imp, s_maps, s_plan, s_apply), _CPU_TIMES[-4:], strict=True):
            parts[key].append(val)
            parts_cpu[key].append(cpu)
    # Per-step orthogonality term (forward + backward), paid every optimizer step.
    orth = []
    for _ in range(args.orth_repeats):

        def orth_step() -> None:
            fm.orth_reg().backward()

        _, s = _timed(orth_step, device)
        orth.append(s)
    for p in fm.parameters():
        p.grad = None
    slots = r + args.capacity_extra
    sum_io = sum(layer.in_features + layer.out_features for _, layer in fm.flexlora_layers())
    orth_flops = 3 * 2 * slots * slots * sum_io  # P^T P and Q Q^T: 2·d·R² each, x3 for forward + backward
    lora_step_flops = 4 * LLAMA3_8B["params"] * BATCH * SEQ
    event_ms = 1e3 * summarize(events)["median"]
    event_cpu_ms = 1e3 * summarize(events_cpu)["median"]
    paper_step_s = PAPER_LORA_HOURS * 3600 / PAPER_STEPS
    flops_step_s = lora_step_flops / (A100_BF16_FLOPS * MFU)
    return {
        "r": r,
        "slots_per_matrix": slots,
        "matrices": len(fm.module_names),
        "adapter_floats": n_adapter,
        "event_ms": summarize([1e3 * s for s in events]),
        "event_cpu_ms": summarize([1e3 * s for s in events_cpu]),
        "breakdown_ms": {k: summarize([1e3 * s for s in v]) for k, v in parts.items()},
        "breakdown_cpu_ms": {k: summarize([1e3 * s for s in v]) for k, v in parts_cpu.items()},
        "orth_reg_fwd_bwd_ms": summarize([1e3 * s for s in orth]),
        "orth_reg_flops": orth_flops,
        "orth_reg_flops_fraction_of_lora_step": orth_flops / lora_step_flops,
        "adapter_forward_flops_fraction": {
            # per token, 2·R·(in+out) for the adapter vs 2·N for the whole model
            "flexlora_slots": slots * sum_io / LLAMA3_8B["params"],
            "lora_r": r * sum_io / LLAMA3_8B["params"],
        },
        "step_time_estimates_s": {"paper_table13_lora": paper_step_s, "flops_40pct_mfu_a100": flops_step_s},
        # CPU time is the event's own work; wall time also counts waiting for a busy machine (an upper bound).
        "event_fraction_of_step": {"cpu": event_cpu_ms / 1e3 / paper_step_s, "wall": event_ms / 1e3 / paper_step_s},
        "amortised_fraction_per_step": {
            "cpu": event_cpu_ms / 1e3 / paper_step_s / DELTA_T,
            "wall": event_ms / 1e3 / paper_step_s / DELTA_T,
        },
        "final_total_rank": fm.total_rank(),
        "initial_total_rank": r * len(fm.module_names),
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    offline_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    result: dict[str, Any] = {
        "benchmark": "event_cost",
        "config": vars(args),
        "machine": machine_info(device),
        "provenance": provenance(),
        "assumptions": {
            "paper_steps": PAPER_STEPS,
            "paper_lora_hours": PAPER_LORA_HOURS,
            "batch": BATCH,
            "seq_len": SEQ,
            "lora_step_flops": 4 * LLAMA3_8B["params"] * BATCH * SEQ,
            "a100_bf16_flops": A100_BF16_FLOPS,
            "mfu": MFU,
            "delta_t": DELTA_T,
        },
        "results": [measure(r, args, device) for r in args.ranks],
    }
    write_json(args.output, result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.event_cost", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--capacity-extra", type=int, default=21)
    p.add_argument("--repeats", type=int, default=20, help="Events timed (half whole, half piece by piece).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed events first.")
    p.add_argument("--orth-repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "| r | slots | event CPU ms | event wall ms | CPU ms: importance | rank/cap maps | plan | apply_plan+surgery "
        "| event / one step (CPU; wall) | amortised per step, Δ_T=1000 (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        e, c, b = row["event_ms"], row["event_cpu_ms"], row["breakdown_cpu_ms"]
        frac, amort = row["event_fraction_of_step"], row["amortised_fraction_per_step"]
        lines.append(
            f"| {row['r']} | {row['slots_per_matrix']} | {c['median']:.1f} [{c['q25']:.1f}, {c['q75']:.1f}] | "
            f"{e['median']:.1f} [{e['q25']:.1f}, {e['q75']:.1f}] | "
            + " | ".join(f"{b[k]['median']:.1f}" for k in ("importance", "maps", "plan", "apply_plan"))
            + f" | {100 * frac['cpu']:.2f} %; {100 * frac['wall']:.2f} % | {100 * amort['cpu']:.4f} % |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    print(format_table(run(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
