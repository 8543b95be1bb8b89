"""Training cost: step time and peak memory of FlexLoRA vs PEFT LoRA vs PEFT AdaLoRA (paper App. E).

Usage::

    python -m benchmarks.cost --model tiny                                   # seconds
    python -m benchmarks.cost --model smollm2 --repeats 3 --steps 2 --threads 1 --output benchmarks/results/cost_smollm2.json

Protocol:

* Same base model, batch (random token ids, labels = inputs), sequence length, rank ``r``, ``lora_alpha``, dropout
  and target modules (q, k, v, up, down: the paper's LLaMA3-8B setting) for the three methods; see
  `benchmarks.common` for how each adapter is configured (FlexLoRA with ``r + capacity_extra`` slots per matrix,
  AdaLoRA with ``init_r = r`` and ``target_r = r - 1``).
* **Time**: the three models live in one process and are stepped round-robin: in repeat k each method runs
  ``--steps`` optimizer steps in turn, the starting method rotating with k. After ``--warmup`` untimed steps, every
  step is a FlexLoRA reallocation event (b0 = 4, constant budget) and an AdaLoRA masking step (``deltaT = 1``), so
  both methods' bookkeeping is inside the timed window (the worst case: the paper has one event per 100-1000
  steps). FlexLoRA's time includes its orthogonality term (γ·R in the loss) and the event (importance of all
  matrices, plan, prune/expand, AdamW state reset); AdaLoRA's includes PEFT's orthogonality term and
  ``update_and_allocate`` every step. A repeat's value is the mean step time of its steps; we report the median
  and IQR over repeats, and the ratio to PEFT LoRA computed *within* each repeat (paired), then summarised.
* **Memory**: one fresh subprocess per method (``--memory subprocess``, default) builds the model, starts the
  meter, runs ``--warmup + --steps`` steps and reports the peak: ``torch.cuda.max_memory_allocated`` on CUDA; on
  the CPU the peak RSS (``VmHWM`` after a reset through ``/proc/self/clear_refs``), with glibc's mmap threshold
  pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS. ``delta`` = peak minus the memory in use
  when training started (model weights excluded), i.e. gradients, AdamW state, activations and events.

Runs unchanged on CUDA (``--device auto`` picks it; ``--dtype bf16`` loads the base model in bfloat16, the adapters
stay float32 as both libraries create them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .common import (
    DTYPES,
    METHODS,
    AdapterSpec,
    PeakMemory,
    adapter_parameter_counts,
    asdict,
    build_trainee,
    load_causal_lm,
    machine_info,
    offline_env,
    pick_device,
    random_batch,
    rotated,
    setup_logging,
    summarize,
    write_json,
)

logger = logging.getLogger("benchmarks.cost")

_MARKER = "BENCHMARK_RESULT "
_TIME_KEYS = ("step_s", "cpu_s", "alloc_s", "alloc_cpu_s")
DEFAULTS = {
    "tiny": {"repeats": 5, "steps": 4, "batch_size": 4, "seq_len": 64},
    "smollm2": {"repeats": 3, "steps": 3, "batch_size": 8, "seq_len": 128},
    "smollm2-random": {"repeats": 3, "steps": 3, "batch_size": 8, "seq_len": 128},
}


def _spec(args: argparse.Namespace) -> AdapterSpec:
    return AdapterSpec(
        r=args.r,
        capacity_extra=args.capacity_extra,
        b0=args.b0,
        first_event_after=args.warmup,
        total_steps=args.warmup + args.repeats * args.steps,
        adalora_init_r=args.adalora_init_r,
        adalora_target_r=args.adalora_target_r,
        lora_dropout=args.dropout,
        flexlora_every=args.flexlora_every,
    )


def _memory_worker(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Build one method's model in this process and measure the peak memory of its training steps."""
    device = pick_device(args.device)
    base = load_causal_lm(args.model, device=device, dtype=DTYPES[args.dtype], seed=args.seed)
    spec = _spec(args)
    spec.total_steps = args.warmup + args.steps
    trainee = build_trainee(method, base, spec, device=device, copy_base=False)
    batch = random_batch(base.config.vocab_size, args.batch_size, args.seq_len, device=device, seed=args.seed)
    meter = PeakMemory(device)
    meter.start()
    for _ in range(args.warmup + args.steps):
        trainee.step(batch)
    result = meter.stop()
    result["params"] = adapter_parameter_counts(method, trainee.model)
    return result


def _memory_subprocess(args: argparse.Namespace, method: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.cost", "--worker-memory", method, *args.argv]
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed tensors are unmapped, so RSS follows live memory
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    logger.info("memory: %s in a fresh subprocess", method)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER) :])
    raise RuntimeError(f"memory worker for {method} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def measure_time(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved, round-robin timing of all methods in this process."""
    device = pick_device(args.device)
    base = load_causal_lm(args.model, device=device, dtype=DTYPES[args.dtype], seed=args.seed)
    spec = _spec(args)
    methods = list(args.methods)
    trainees = {m: build_trainee(m, base, spec, device=device) for m in methods}
    del base
    batch = random_batch(
        trainees[methods[0]].model.config.vocab_size, args.batch_size, args.seq_len, device=device, seed=args.seed
    )
    for m in methods:  # untimed warm-up (allocator, kernels, lazily created optimizer state)
        for _ in range(args.warmup):
            trainees[m].step(batch)
    per_repeat: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for k in range(args.repeats):
        for m in rotated(methods, k):
            rows = [trainees[m].step(batch) for _ in range(args.steps)]
            rec = {key: sum(r[key] for r in rows) / len(rows) for key in _TIME_KEYS}
            rec["loss"] = rows[-1]["loss"]
            per_repeat[m].append(rec)
            logger.info(
                "repeat %d %-8s %.4f s/step wall, %.4f s/step CPU (allocation %.2f ms wall)",
                k,
                m,
                rec["step_s"],
                rec["cpu_s"],
                1e3 * rec["alloc_s"],
            )
    out: dict[str, Any] = {}
    for m in methods:
        entry: dict[str, Any] = {key: summarize([r[key] for r in per_repeat[m]]) for key in _TIME_KEYS}
        entry["raw"] = per_repeat[m]
        entry["params"] = adapter_parameter_counts(m, trainees[m].model)
        if "lora" in per_repeat:
            for key in ("step_s", "cpu_s"):
                pairs = zip(per_repeat[m], per_repeat["lora"], strict=True)
                entry[f"{key}_ratio_to_lora"] = summarize([a[key] / b[key] for a, b in pairs])
        out[m] = entry
    flex = trainees.get("flexlora")
    if flex is not None:
        out["flexlora"]["final_total_rank"] = flex.model.total_rank()  # type: ignore[operator]
        out["flexlora"]["events"] = len(flex.model.rank_history)  # type: ignore[arg-type]
    return out


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    methods = list(args.methods)
    if args.memory == "off":
        return {}
    res = {
        m: (_memory_subprocess(args, m) if args.memory == "subprocess" else _memory_worker(args, m)) for m in methods
    }
    if "lora" in res:
        for m in methods:
            res[m]["delta_ratio_to_lora"] = res[m]["delta_mib"] / max(res["lora"]["delta_mib"], 1e-9)
            res[m]["peak_ratio_to_lora"] = res[m]["peak_mib"] / max(res["lora"]["peak_mib"], 1e-9)
    if args.memory == "inprocess":
        for m in methods:
            res[m]["note"] = "measured in one process one after the other: approximate on the CPU"
    return res


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and return (and optionally write) its JSON record."""
    args = parse_args(argv)
    offline_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_memory:
        return _memory_worker(args, args.worker_memory)
    device = pick_device(args.device)
    spec = _spec(args)
    logger.info(
        "cost benchmark: model=%s device=%s dtype=%s batch=%dx%d repeats=%d steps=%d",
        args.model,
        device,
        args.dtype,
        args.batch_size,
        args.seq_len,
        args.repeats,
        args.steps,
    )
    result: dict[str, Any] = {
        "benchmark": "cost",
        "command": "python -m benchmarks.cost " + " ".join(args.argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("argv", "worker_memory")},
        "adapter_spec": asdict(spec) | {"adalora_init_r": spec.init_r, "adalora_target_r": spec.target_r},
        "machine": machine_info(device),
    }
    result["timing"] = measure_time(args)
    result["memory"] = measure_memory(args)
    write_json(args.output, result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=tuple(DEFAULTS), default="tiny")
    p.add_argument("--repeats", type=int, default=None, help="Round-robin repeats (default: 5 tiny, 3 smollm2).")
    p.add_argument("--steps", type=int, default=None, help="Timed optimizer steps per method per repeat.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps per method before timing (no events).")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--r", type=int, default=8, help="Rank (LoRA r, FlexLoRA r, AdaLoRA init_r).")
    p.add_argument("--capacity-extra", type=int, default=21, help="FlexLoRA slots per matrix beyond r.")
    p.add_argument("--b0", type=int, default=4)
    p.add_argument("--flexlora-every", type=int, default=1,
                   help="FlexLoRA event every N timed steps (1: every step, the worst case; 0: none, the steady state).")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--adalora-init-r", type=int, default=None, help="Default: r.")
    p.add_argument("--adalora-target-r", type=int, default=None, help="Default: init_r - 1.")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="Base model dtype (adapters stay fp32).")
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="Write the JSON record here.")
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "lora" not in args.methods:
        logger.warning("PEFT LoRA is not among --methods: no ratios will be reported.")
    # Arguments a memory worker needs (everything except the output path and the memory mode).
    drop = {"--output", "--memory"}
    kept: list[str] = []
    skip = False
    for tok in raw:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in drop:
            skip = "=" not in tok
            continue
        kept.append(tok)
    args.argv = kept if args.worker_memory is None else raw
    return args


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args_list = list(sys.argv[1:] if argv is None else argv)
    result = run(args_list)
    if "--worker-memory" in args_list:
        print(_MARKER + json.dumps(result), flush=True)
        return 0
    print(format_table(result))
    return 0


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the timing and memory results (median [q25, q75] over repeats)."""

    def iqr(d: dict[str, float], scale: float = 1.0, fmt: str = ".3f") -> str:
        return f"{scale * d['median']:{fmt}} [{scale * d['q25']:{fmt}}, {scale * d['q75']:{fmt}}]"

    lines = [
        "| method | wall s/step | wall ratio to LoRA | CPU s/step | CPU ratio to LoRA | allocation ms/step (wall) "
        "| peak mem MiB | training mem delta MiB | delta ratio to LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, t in result["timing"].items():
        mem = result.get("memory", {}).get(m, {})
        cells = [
            m,
            iqr(t["step_s"], fmt=".4f"),
            iqr(t["step_s_ratio_to_lora"]) if "step_s_ratio_to_lora" in t else "-",
            iqr(t["cpu_s"], fmt=".4f"),
            iqr(t["cpu_s_ratio_to_lora"]) if "cpu_s_ratio_to_lora" in t else "-",
            iqr(t["alloc_s"], 1e3, ".2f"),
            f"{mem['peak_mib']:.0f}" if mem else "-",
            f"{mem['delta_mib']:.0f}" if mem else "-",
            f"{mem['delta_ratio_to_lora']:.3f}" if "delta_ratio_to_lora" in mem else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
