"""Quality: FlexLoRA vs PEFT LoRA vs PEFT AdaLoRA on real BIG-bench classification tasks with MiniLM-L6.

Usage (the full run is sized for about half an hour on 2 CPU cores; run two shards side by side, one thread each,
then aggregate)::

    python -m benchmarks.quality --shard 0/2 --threads 1 &   # appends to benchmarks/results/quality_runs.jsonl
    python -m benchmarks.quality --shard 1/2 --threads 1 &
    python -m benchmarks.quality --report                    # -> benchmarks/results/quality.json + markdown tables

Runs already in the runs file are skipped, so an interrupted run resumes where it stopped.

Model and data: all-MiniLM-L6-v2 (`flexlora_hf.data.assets.minilm_path`, 22.7M params, BERT) as a sequence classifier
on three BIG-bench tasks (`flexlora_hf.data.bigbench.load_bigbench_classification`, fixed 80/20 split, seed 42):
``vitaminc_fact_verification`` (3-way fact verification, MNLI-like), ``epistemic_reasoning`` (2-way entailment,
RTE-like) and ``hyperbaton`` (adjective order, CoLA-like). The train split is subsampled to ``steps x batch``
examples, the validation split to ``--n-eval``; both are fixed across seeds and methods.

Equal budget: every method adapts the same 36 matrices (query, key, value, attention output, intermediate, output
of the 6 layers) with rank 8, ``lora_alpha`` 16, and trains the classifier head in full.

* ``lora``: PEFT LoRA r = 8.
* ``flexlora``: FlexLoRA r = 8 (total active rank 36 x 8 = 288, conserved by bidirectional events), b0 = 4, the
  paper's schedule (eq. 4) with T_warmup = T_final = 20 % of the steps and Δ_T = steps / 20.
* ``adalora``: PEFT AdaLoRA init_r = 12, target_r = 8: the final budget is 36 x 8 = 288 ranks, exactly
  FlexLoRA's total rank (AdaLoRA's own 1.5x recipe; PEFT cannot run init_r = target_r, see docs/benchmarks.md),
  with the same tinit / tfinal / deltaT as FlexLoRA, ``update_and_allocate`` after every optimizer step.
* Both SVD methods use the orthogonality weight 0.1. Same optimizer (AdamW, no weight decay, linear schedule with
  10 % warm-up), batch 16, 150 steps, sequence length, seeds (0-2), 400 validation examples.

Learning rate: the only hyper-parameter that differs in the main table. LoRA trains at 2e-3 and the two SVD-form
methods at 1e-2: with λ = 0 and N(0, 0.02²) vectors at the start, Adam moves one scalar λ per direction where LoRA
moves a whole column of B, so at LoRA's learning rate the SVD forms barely leave the base model within 150 steps.
Each method's rate is the better of {2e-3, 1e-2} on hyperbaton (seeds 0-1); that grid, all three methods at both
rates, is reported too (the same-hyper-parameter comparison), with FlexLoRA without the orthogonality term as a
diagnostic.

Ablations (the paper's Tables 4-6) on ``hyperbaton`` (``--ablation-task``), seeds 0-1, FlexLoRA at lr 1e-2:
importance entropy / nuclear / frobenius; allocation bidirectional / prune_only / expand_only; expansion init
zero_impact / small / zero / orthogonal. The default FlexLoRA run (entropy, bidirectional, zero_impact) is shared
with the main comparison. ``--parts`` selects main / grid / ablations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .common import machine_info, mean_std, offline_env, pick_device, setup_logging, write_json

logger = logging.getLogger("benchmarks.quality")

TASKS = {
    "vitaminc_fact_verification": {"max_len": 96},
    "epistemic_reasoning": {"max_len": 80},
    "hyperbaton": {"max_len": 64},
}
ABLATION_TASK = "hyperbaton"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# Learning rates: LoRA at 2e-3; the two SVD-form methods (λ = 0 and N(0, 0.02²) vectors at the start) at 1e-2.
# Chosen as the better of {2e-3, 1e-2} per method on hyperbaton (seeds 0-1, see LR_GRID); the grid itself, with all
# three methods at both learning rates, is the same-hyper-parameter comparison.
SVD_LR = "lr=0.01"
METHODS = ("lora", f"adalora:{SVD_LR}", f"flexlora:{SVD_LR}")
METHOD_LABELS = {"lora": "PEFT LoRA (lr 2e-3)", METHODS[1]: "PEFT AdaLoRA (lr 1e-2)", METHODS[2]: "FlexLoRA (lr 1e-2)"}
LR_GRID = ("lora", "adalora", "flexlora", "lora:lr=0.01", "adalora:lr=0.01", "flexlora:lr=0.01")
# FlexLoRA without the orthogonality term (is γ·R what slows it down?).
DIAGNOSTICS = ("flexlora:lr=0.01,orth_reg_weight=0.0",)
ABLATIONS = tuple(
    f"flexlora:{change},{SVD_LR}"
    for change in (
        "importance=nuclear",
        "importance=frobenius",
        "allocation=prune_only",
        "allocation=expand_only",
        "expansion_init=small",
        "expansion_init=zero",
        "expansion_init=orthogonal",
    )
)
PARTS = ("main", "grid", "ablations")
SEEDS = (0, 1, 2)
ABLATION_SEEDS = (0, 1)
DEFAULT_RUNS = Path("benchmarks/results/quality_runs.jsonl")
DEFAULT_REPORT = Path("benchmarks/results/quality.json")


# ---------------------------------------------------------------------------------------------------------- plan
def all_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (task, method, seed) of the selected parts in a fixed order: the main comparison on the cheap tasks,
    the LR grid and diagnostics, the ablations, then the most expensive task (vitaminc), so an interrupted run has
    the most informative results first. Runs shared between parts (same key) appear once."""
    main = [
        {"task": task, "method": method, "seed": seed}
        for task in sorted(args.tasks, key=lambda t: TASKS[t]["max_len"])
        for method in args.methods
        for seed in args.seeds
    ]
    grid = [
        {"task": ABLATION_TASK, "method": method, "seed": seed}
        for method in (*LR_GRID, *DIAGNOSTICS)
        for seed in args.ablation_seeds
    ]
    ablations = [
        {"task": args.ablation_task, "method": method, "seed": seed}
        for method in ABLATIONS
        for seed in args.ablation_seeds
    ]
    last = max(TASKS, key=lambda t: TASKS[t]["max_len"])
    ordered = [r for r in main if r["task"] != last and "main" in args.parts]
    ordered += grid if "grid" in args.parts else []
    ordered += ablations if "ablations" in args.parts else []
    ordered += [r for r in main if r["task"] == last and "main" in args.parts]
    unique: dict[str, dict[str, Any]] = {}
    for run in ordered:
        unique.setdefault(run_key(run), run)
    return list(unique.values())


def run_key(run: dict[str, Any]) -> str:
    return f"{run['task']}|{run['method']}|{run['seed']}"


def done_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            keys.add(run_key(json.loads(line)))
    return keys


# ---------------------------------------------------------------------------------------------------------- data
_DATA_CACHE: dict[tuple[str, int, int], Any] = {}


def load_task(task: str, n_train: int, n_eval: int, tokenizer: Any) -> Any:
    """Tokenised, fixed train/validation subsets of one task (same for every method and seed)."""
    key = (task, n_train, n_eval)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    from flexlora_hf.data.bigbench import load_bigbench_classification

    ds = load_bigbench_classification(task, validation_fraction=0.2, seed=42)
    train, val = ds["train"], ds["validation"]
    train = train.shuffle(seed=42).select(range(min(n_train, len(train))))
    val = val.shuffle(seed=42).select(range(min(n_eval, len(val))))
    max_len = TASKS[task]["max_len"]

    def tok(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_len)

    out = {
        "train": train.map(tok, batched=True, remove_columns=["text"]),
        "validation": val.map(tok, batched=True, remove_columns=["text"]),
        "num_labels": train.features["label"].num_classes,
        "label_names": train.features["label"].names,
    }
    _DATA_CACHE[key] = out
    return out


# ---------------------------------------------------------------------------------------------------------- methods
def _coerce(value: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``flexlora:importance=nuclear,lr=0.01`` -> ("flexlora", {"importance": "nuclear", "lr": 0.01})."""
    name, _, rest = method.partition(":")
    overrides = {k: _coerce(v) for k, v in (item.split("=", 1) for item in rest.split(",") if item)}
    return name, overrides


def schedule(steps: int) -> dict[str, int]:
    """T_warmup = T_final = 20 % of the steps, Δ_T = 5 % (the paper's GLUE ratios are similar: e.g. RTE 500/500/100)."""
    return {"t_warmup": int(0.2 * steps), "t_final": int(0.2 * steps), "delta_t": max(1, steps // 20)}


def make_trainer(method: str, model: Any, args: argparse.Namespace, targs: Any, data: dict[str, Any]) -> Any:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    name, overrides = parse_method(method)
    overrides.pop("lr", None)  # already in `targs`
    if overrides and name != "flexlora":
        raise ValueError(f"{method!r}: only FlexLoRA variants take config overrides.")
    sched = schedule(args.steps)
    common = {
        "args": targs,
        "train_dataset": data["train"],
        "data_collator": DataCollatorWithPadding(data["tokenizer"]),
    }
    if name == "flexlora":
        from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer

        fields = {
            "r": args.r,
            "lora_alpha": args.alpha,
            "target_modules": list(TARGETS),
            "b0": args.b0,
            "orth_reg_weight": args.orth_reg_weight,
            "seed": targs.seed,
            **sched,
        }
        cfg = FlexLoRAConfig(**(fields | overrides))
        return FlexLoRATrainer(model=model, flexlora_config=cfg, **common)
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if name == "lora":
        peft_model = get_peft_model(
            model, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=list(TARGETS), task_type="SEQ_CLS")
        )
        return Trainer(model=peft_model, **common)
    if name == "adalora":
        cfg = AdaLoraConfig(
            init_r=args.adalora_init_r,
            target_r=args.r,
            lora_alpha=args.alpha,
            target_modules=list(TARGETS),
            tinit=sched["t_warmup"],
            tfinal=sched["t_final"],
            deltaT=sched["delta_t"],
            total_step=args.steps,
            orth_reg_weight=args.orth_reg_weight,
            task_type="SEQ_CLS",
        )
        peft_model = get_peft_model(model, cfg)

        class AdaLoRAAllocate(TrainerCallback):
            """PEFT's required call: after optimizer.step(), before zero_grad (grads are still there)."""

            def on_optimizer_step(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
                peft_model.base_model.update_and_allocate(state.global_step + 1)

        return Trainer(model=peft_model, callbacks=[AdaLoRAAllocate()], **common)
    raise ValueError(f"Unknown method {method!r}.")


def final_ranks(method: str, trainer: Any) -> dict[str, Any]:
    """Final rank per adapted matrix (FlexLoRA: active slots; AdaLoRA: unmasked triplets; LoRA: r)."""
    name, _ = parse_method(method)
    model = trainer.model
    if name == "flexlora":
        ranks = model.rank_map()
    elif name == "adalora":
        ranks = {}
        for n, p in model.named_parameters():
            if "lora_E" in n:
                ranks[n.replace(".lora_E.default", "")] = int((p.detach() != 0).sum())
    else:
        return {}
    total = sum(ranks.values())
    per_layer: dict[str, int] = defaultdict(int)
    for n, r in ranks.items():
        parts = n.split(".")
        layer = next((parts[i + 1] for i, s in enumerate(parts) if s == "layer" and i + 1 < len(parts)), "?")
        per_layer[layer] += r
    return {
        "total_rank": total,
        "min": min(ranks.values()),
        "max": max(ranks.values()),
        "per_layer": per_layer,
        "ranks": ranks,
    }


def train_one(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one (task, method, seed); returns the record appended to the runs file."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments, set_seed

    from flexlora_hf.data.assets import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = dict(load_task(run["task"], args.steps * args.batch_size, args.n_eval, tokenizer))
    data["tokenizer"] = tokenizer
    set_seed(run["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=data["num_labels"])
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="flexlora-quality-") as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            max_steps=args.steps,
            learning_rate=float(parse_method(run["method"])[1].get("lr", args.lr)),
            lr_scheduler_type="linear",
            warmup_steps=max(1, int(0.1 * args.steps)),
            weight_decay=0.0,
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=run["seed"],
            data_seed=run["seed"],
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            # Trainer finds label names from the model *class*; FlexLoRAModel's generic forward hides them, and
            # predict() would then return (loss, logits) without labels. Naming them keeps every method equal.
            label_names=["labels"],
        )
        trainer = make_trainer(run["method"], model, args, targs, data)
        t0, c0 = time.perf_counter(), time.process_time()
        train_out = trainer.train()
        train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        pred = trainer.predict(data["validation"])
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y_pred = np.argmax(logits, axis=-1)
    y_true = np.asarray(data["validation"]["label"])
    majority = float(np.bincount(y_true).max() / len(y_true))
    counts = {}
    for key, val in (("trainable", sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),):
        counts[key] = int(val)
    if parse_method(run["method"])[0] == "flexlora":
        active, allocated, _ = trainer.model.trainable_parameter_counts()
        counts.update({"active": int(active), "allocated": int(allocated)})
    return {
        **run,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "majority_baseline": majority,
        "train_loss": float(train_out.training_loss),
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "params": counts,
        "ranks": final_ranks(run["method"], trainer),
        "n_train": len(data["train"]),
        "n_eval": len(data["validation"]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": float(parse_method(run["method"])[1].get("lr", args.lr)),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------- report
def load_runs(path: Path) -> list[dict[str, Any]]:
    """Records of the runs file (a torn last line from an interrupted run is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """task -> method -> mean ± std over seeds of accuracy, macro-F1, CPU time, and the final total rank."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["method"])].append(row)
    summary: dict[str, Any] = {}
    for (task, method), items in sorted(groups.items()):
        items.sort(key=lambda r: r["seed"])
        summary.setdefault(task, {})[method] = {
            "accuracy": mean_std([r["accuracy"] for r in items]),
            "macro_f1": mean_std([r["macro_f1"] for r in items]),
            "train_cpu_s": mean_std([r["train_cpu_s"] for r in items]),
            "train_wall_s": mean_std([r["train_wall_s"] for r in items]),
            "seeds": [r["seed"] for r in items],
            "lr": items[0]["lr"],
            "majority_baseline": items[0]["majority_baseline"],
            "params": items[0]["params"],
            "final_total_rank": [r["ranks"].get("total_rank") for r in items] if items[0]["ranks"] else None,
        }
    return summary


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Aggregate the runs file into ``--report-file`` and print the markdown tables."""
    rows = load_runs(args.runs_file)
    seeds2 = set(args.ablation_seeds)
    main_rows = [r for r in rows if r["method"] in args.methods and r["seed"] in args.seeds]
    grid_rows = [r for r in rows if r["task"] == ABLATION_TASK and r["method"] in (*LR_GRID, *DIAGNOSTICS)]
    abl_rows = [r for r in rows if r["task"] == args.ablation_task and r["method"] in (METHODS[2], *ABLATIONS)]
    result = {
        "benchmark": "quality",
        "runs_file": str(args.runs_file),
        "n_runs": len(rows),
        "settings": {k: rows[0][k] for k in ("steps", "batch_size", "n_train", "n_eval")} if rows else {},
        "machine": machine_info(pick_device(args.device)),
        "main": aggregate(main_rows),
        "lr_grid": aggregate([r for r in grid_rows if r["seed"] in seeds2]).get(ABLATION_TASK, {}),
        "ablations": aggregate([r for r in abl_rows if r["seed"] in seeds2]).get(args.ablation_task, {}),
        "ablation_task": args.ablation_task,
        "ablation_seeds": sorted(seeds2),
    }
    write_json(args.report_file, result)
    print(format_tables(result))
    return result


def format_tables(result: dict[str, Any]) -> str:
    """Markdown: main comparison, same-LR grid, ablations (accuracy in %: mean ± std over seeds (per seed))."""

    def cell(d: dict[str, Any]) -> str:
        seeds = ", ".join(f"{100 * v:.1f}" for v in d["values"])
        return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f} ({seeds})"

    def ranks(e: dict[str, Any]) -> str:
        return "-" if not e["final_total_rank"] else "/".join(str(x) for x in e["final_total_rank"])

    s = result["main"]
    lines = [
        "| task | majority class | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for task in TASKS:
        if task in s:
            row = [task, f"{100 * next(iter(s[task].values()))['majority_baseline']:.1f}"]
            row += [cell(s[task][m]["accuracy"]) if m in s[task] else "-" for m in METHODS]
            lines.append("| " + " | ".join(row) + " |")
    grid = result.get("lr_grid", {})
    if grid:
        lines += [
            "",
            f"Same hyper-parameters, {ABLATION_TASK}, seeds {result['ablation_seeds']}:",
            "",
            "| method | lr 2e-3 | lr 1e-2 |",
            "|---|---|---|",
        ]
        for m in ("lora", "adalora", "flexlora"):
            cells = [cell(grid[k]["accuracy"]) if k in grid else "-" for k in (m, f"{m}:lr=0.01")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        for m in DIAGNOSTICS:
            if m in grid:
                lines.append(f"| {m} | - | {cell(grid[m]['accuracy'])} |")
    abl = result.get("ablations", {})
    if abl:
        lines += [
            "",
            f"Ablations, {result['ablation_task']}, seeds {result['ablation_seeds']}:",
            "",
            "| variant | accuracy | macro-F1 | final total rank per seed |",
            "|---|---|---|---|",
        ]
        for m in (METHODS[2], *ABLATIONS):
            if m in abl:
                e = abl[m]
                lines.append(f"| {m} | {cell(e['accuracy'])} | {cell(e['macro_f1'])} | {ranks(e)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--ablation-task", choices=tuple(TASKS), default=ABLATION_TASK)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=list(ABLATION_SEEDS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--b0", type=int, default=4)
    p.add_argument("--adalora-init-r", type=int, default=12)
    p.add_argument("--orth-reg-weight", type=float, default=0.1)
    p.add_argument("--n-eval", type=int, default=400)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th pending run starting at i.")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-file", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--report-file", type=Path, default=DEFAULT_REPORT)
    p.add_argument("--report", action="store_true", help="Only aggregate the runs file.")
    p.add_argument("--limit", type=int, default=0, help="Stop after this many runs (0: all).")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    offline_env()
    args = parse_args(argv)
    if args.report:
        report(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    i, n = (int(x) for x in args.shard.split("/"))
    done = done_keys(args.runs_file)
    pending = [r for r in all_runs(args) if run_key(r) not in done]
    mine = pending[i::n]
    if args.limit:
        mine = mine[: args.limit]
    logger.info("%d runs pending, %d in shard %s", len(pending), len(mine), args.shard)
    args.runs_file.parent.mkdir(parents=True, exist_ok=True)
    for k, run in enumerate(mine):
        t0 = time.perf_counter()
        record = train_one(run, args)
        with open(args.runs_file, "a") as f:  # one short line per run: O_APPEND keeps shards from interleaving
            f.write(json.dumps(record) + "\n")
        logger.info(
            "[%d/%d] %s acc %.3f (majority %.3f) in %.0f s (%.0f s CPU)",
            k + 1,
            len(mine),
            run_key(run),
            record["accuracy"],
            record["majority_baseline"],
            time.perf_counter() - t0,
            record["train_cpu_s"],
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
