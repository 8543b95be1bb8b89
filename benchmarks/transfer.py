"""Rank-map transfer: uniform PEFT LoRA vs PEFT LoRA with a rank map learned once by FlexLoRA (same total rank).

Usage (sized for about 10 CPU-minutes on one thread; run it with ``OMP_NUM_THREADS=1``)::

    OMP_NUM_THREADS=1 python -m benchmarks.transfer --threads 1   # -> benchmarks/results/transfer.json + table
    python -m benchmarks.transfer --report                        # print the table of an existing JSON again

The question: does FlexLoRA's learned allocation help a *plain* LoRA trained afresh with it (the zero-overhead
reuse that `FlexLoRAModel.to_lora_config()` offers), at the same total rank?

1. **Source run**: FlexLoRA (r = 8, `lora_alpha` 16, b0 = 4, the paper's schedule with T_warmup = T_final = 20 % of
   the steps and Δ_T = 5 %) on the task with a seed of its own (100); its final rank map is turned into a
   `LoraConfig` with `to_lora_config()` (`alpha_policy="constant_scale"`: every module keeps the scale 16 / 8 = 2).
2. **Transfer runs**, seeds 0, 1, 2: PEFT LoRA r = 8 on all 36 matrices (total rank 288, scale 2) vs PEFT LoRA with
   the transferred rank map (total rank 288, scale 2): the only difference is how the 288 directions are spread.
   Same data, optimizer (AdamW, no weight decay, linear schedule with 10 % warm-up), learning rate, batch, steps
   and classifier initialisation (the seed is set before the model is built).

Model and data: all-MiniLM-L6-v2 (`flexlora_hf.data.assets.minilm_path`) as a 4-class sequence classifier on
BIG-bench ``multiemo/all_sentence_en`` (`flexlora_hf.data.bigbench`, 3,000 rows, fixed 80/20 split with seed 42, as
in the quickstart, where FlexLoRA learns within ~150 steps), max length 64, evaluation on a fixed subset of the
validation split. Targets: query, key, value, attention output, intermediate, output of the 6 layers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .common import machine_info, mean_std, offline_env, pick_device, setup_logging, write_json

logger = logging.getLogger("benchmarks.transfer")

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
TASK, SUBTASK, MAX_EXAMPLES, MAX_LEN = "multiemo", "all_sentence_en", 3000, 64
DEFAULT_OUTPUT = Path("benchmarks/results/transfer.json")
ARMS = ("uniform", "transferred")
ARM_LABELS = {"uniform": "PEFT LoRA, uniform r = 8", "transferred": "PEFT LoRA, FlexLoRA's rank map"}


# ---------------------------------------------------------------------------------------------------------- data
def load_minilm_task(n_train: int, n_eval: int) -> tuple[dict[str, Any], Callable[[int, int], Any]]:
    """Tokenised fixed train / validation subsets of multiemo and a MiniLM-L6 classifier factory (num_labels, seed)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexlora_hf.data.assets import minilm_path
    from flexlora_hf.data.bigbench import load_bigbench_classification

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ds = load_bigbench_classification(TASK, subtask=SUBTASK, validation_fraction=0.2, seed=42, max_examples=MAX_EXAMPLES)
    train = ds["train"].shuffle(seed=42).select(range(min(n_train, len(ds["train"]))))
    val = ds["validation"].shuffle(seed=42).select(range(min(n_eval, len(ds["validation"]))))

    def tok(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=MAX_LEN)

    data = {
        "train": train.map(tok, batched=True, remove_columns=["text"]),
        "validation": val.map(tok, batched=True, remove_columns=["text"]),
        "num_labels": train.features["label"].num_classes,
        "tokenizer": tokenizer,
        "task": f"{TASK}/{SUBTASK}",
    }

    def make_model(num_labels: int, seed: int) -> Any:
        from transformers import set_seed

        set_seed(seed)  # the classifier head's initialisation
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)

    return data, make_model


# ---------------------------------------------------------------------------------------------------------- runs
def _training_args(out_dir: str, args: argparse.Namespace, seed: int, steps: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(0.1 * steps)),
        weight_decay=0.0,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=pick_device(args.device).type == "cpu",
        label_names=["labels"],
    )


def _train_and_score(trainer: Any, data: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    pred = trainer.predict(data["validation"])
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y_pred = np.argmax(logits, axis=-1)
    y_true = np.asarray(data["validation"]["label"])
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "majority_baseline": float(np.bincount(y_true).max() / len(y_true)),
        "train_loss": float(out.training_loss),
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "trainable_params": int(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
    }


def source_run(args: argparse.Namespace, data: dict[str, Any], make_model: Callable[[int, int], Any]) -> dict[str, Any]:
    """Train FlexLoRA once; return its scores, final rank map and the transferred `LoraConfig`."""
    from transformers import DataCollatorWithPadding

    from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer

    steps = args.source_steps
    sched = {"t_warmup": int(0.2 * steps), "t_final": int(0.2 * steps), "delta_t": max(1, steps // 20)}
    cfg = FlexLoRAConfig(
        r=args.r, lora_alpha=args.alpha, target_modules=list(TARGETS), b0=args.b0, orth_reg_weight=0.1,
        seed=args.source_seed, **sched,
    )  # fmt: skip
    model = make_model(data["num_labels"], args.source_seed)
    with tempfile.TemporaryDirectory(prefix="flexlora-transfer-") as out_dir:
        trainer = FlexLoRATrainer(
            model=model,
            args=_training_args(out_dir, args, args.source_seed, steps),
            train_dataset=data["train"],
            data_collator=data.get("collator") or DataCollatorWithPadding(data["tokenizer"]),
            flexlora_config=cfg,
        )
        scores = _train_and_score(trainer, data)
        flex = trainer.flexlora_model
        rank_map = flex.rank_map()
        lora_config = flex.to_lora_config(alpha_policy="constant_scale")
    return {
        "method": "flexlora",
        "seed": args.source_seed,
        "steps": steps,
        "schedule": sched,
        "events": len(flex.rank_history),
        **scores,
        "rank_map": rank_map,
        "rank_summary": rank_summary(rank_map),
        "lora_config": {k: v for k, v in lora_config.to_dict().items() if k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")},
        "_lora_config": lora_config,
    }


def transfer_run(
    arm: str, seed: int, args: argparse.Namespace, data: dict[str, Any], make_model: Callable[[int, int], Any], lora_config: Any
) -> dict[str, Any]:
    """One plain PEFT LoRA run: uniform r (arm "uniform") or the transferred rank map (arm "transferred")."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import DataCollatorWithPadding, Trainer

    if arm == "uniform":
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=list(TARGETS), task_type="SEQ_CLS")
    else:
        cfg = copy.deepcopy(lora_config)
        cfg.task_type = "SEQ_CLS"
    model = get_peft_model(make_model(data["num_labels"], seed), cfg)
    ranks = {name: int(m.r["default"]) for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    with tempfile.TemporaryDirectory(prefix="flexlora-transfer-") as out_dir:
        trainer = Trainer(
            model=model,
            args=_training_args(out_dir, args, seed, args.steps),
            train_dataset=data["train"],
            data_collator=data.get("collator") or DataCollatorWithPadding(data["tokenizer"]),
        )
        scores = _train_and_score(trainer, data)
    return {"arm": arm, "seed": seed, "steps": args.steps, **scores, "total_rank": sum(ranks.values()), "n_modules": len(ranks)}


def rank_summary(rank_map: dict[str, int]) -> dict[str, Any]:
    """Totals per layer and per module type, min / max, and how many directions moved away from uniform r."""
    per_layer: dict[str, int] = defaultdict(int)
    per_type: dict[str, int] = defaultdict(int)
    for name, rank in rank_map.items():
        parts = name.split(".")
        layer = next((parts[i + 1] for i, s in enumerate(parts) if s == "layer" and i + 1 < len(parts)), "?")
        kind = ".".join(parts[parts.index(layer) + 1 :]) if layer in parts else name
        per_layer[layer] += rank
        per_type[kind] += rank
    initial = round(sum(rank_map.values()) / max(len(rank_map), 1))
    return {
        "total_rank": sum(rank_map.values()),
        "n_modules": len(rank_map),
        "min": min(rank_map.values(), default=0),
        "max": max(rank_map.values(), default=0),
        "moved_from_uniform": sum(max(0, r - initial) for r in rank_map.values()),
        "per_layer": dict(per_layer),
        "per_type": dict(per_type),
    }


def run_study(
    args: argparse.Namespace, data: dict[str, Any], make_model: Callable[[int, int], Any], output: Path | None
) -> dict[str, Any]:
    """Source run, then the two arms per seed (interleaved, so a cut-short run still has paired seeds)."""
    t0 = time.process_time()
    source = source_run(args, data, make_model)
    lora_config = source.pop("_lora_config")
    logger.info(
        "source FlexLoRA: acc %.3f, %d events, ranks %d-%d, total %d",
        source["accuracy"], source["events"], source["rank_summary"]["min"], source["rank_summary"]["max"],
        source["rank_summary"]["total_rank"],
    )  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "transfer",
        "task": data.get("task", "?"),
        "settings": {
            "steps": args.steps, "source_steps": args.source_steps, "batch_size": args.batch_size, "lr": args.lr,
            "r": args.r, "lora_alpha": args.alpha, "b0": args.b0, "seeds": list(args.seeds),
            "n_train": len(data["train"]), "n_eval": len(data["validation"]), "targets": TARGETS,
            "alpha_policy": "constant_scale",
        },  # fmt: skip
        "machine": machine_info(pick_device(args.device)),
        "source": source,
        "runs": [],
    }
    for seed in args.seeds:
        for arm in ARMS:
            record = transfer_run(arm, seed, args, data, make_model, lora_config)
            result["runs"].append(record)
            logger.info(
                "%s seed %d: acc %.3f macro-F1 %.3f (total rank %d over %d modules, %.0f s CPU)",
                arm, seed, record["accuracy"], record["macro_f1"], record["total_rank"], record["n_modules"],
                record["train_cpu_s"],
            )  # fmt: skip
            result["summary"] = summarize(result["runs"])
            result["total_cpu_s"] = time.process_time() - t0
            write_json(output, result)
    return result


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        items = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if items:
            out[arm] = {
                "accuracy": mean_std([r["accuracy"] for r in items]),
                "macro_f1": mean_std([r["macro_f1"] for r in items]),
                "train_cpu_s": mean_std([r["train_cpu_s"] for r in items]),
                "seeds": [r["seed"] for r in items],
                "trainable_params": items[0]["trainable_params"],
                "total_rank": items[0]["total_rank"],
            }
    paired = [
        t["accuracy"] - u["accuracy"]
        for u in runs if u["arm"] == "uniform"
        for t in runs if t["arm"] == "transferred" and t["seed"] == u["seed"]
    ]  # fmt: skip
    if paired:
        out["paired_accuracy_difference"] = mean_std(paired)
    return out


def format_table(result: dict[str, Any]) -> str:
    """Markdown: per-seed values and mean ± std, accuracy and macro-F1 in %."""

    def cell(d: dict[str, Any]) -> str:
        seeds = ", ".join(f"{100 * v:.1f}" for v in d["values"])
        return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f} ({seeds})"

    s = result["summary"]
    lines = [
        "| arm | total rank (modules) | trainable params | accuracy | macro-F1 | train CPU s / run |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        if arm in s:
            e = s[arm]
            n_modules = next(r["n_modules"] for r in result["runs"] if r["arm"] == arm)
            lines.append(
                f"| {ARM_LABELS[arm]} | {e['total_rank']} ({n_modules}) | {e['trainable_params']:,} | "
                f"{cell(e['accuracy'])} | {cell(e['macro_f1'])} | {e['train_cpu_s']['mean']:.0f} |"
            )
    if "paired_accuracy_difference" in s:
        d = s["paired_accuracy_difference"]
        lines += ["", f"Paired difference (transferred - uniform), accuracy: {cell(d)} points."]
    src = result["source"]
    rs = src["rank_summary"]
    lines += [
        "",
        f"Source FlexLoRA run (seed {src['seed']}, {src['steps']} steps, {src['events']} events): accuracy "
        f"{100 * src['accuracy']:.1f} %, final ranks {rs['min']}-{rs['max']}, total {rs['total_rank']}; per layer "
        + ", ".join(f"L{k} {v}" for k, v in rs["per_layer"].items())
        + "; per module type "
        + ", ".join(f"{k} {v}" for k, v in rs["per_type"].items())
        + ".",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="Optimizer steps of each transfer run.")
    p.add_argument("--source-steps", type=int, default=120, help="Optimizer steps of the FlexLoRA source run.")
    p.add_argument("--source-seed", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--b0", type=int, default=4)
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--report", action="store_true", help="Only print the table of --output.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    offline_env()
    args = parse_args(argv)
    if args.report:
        print(format_table(json.loads(args.output.read_text())))  # noqa: T201 -- the table is the command's output
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data, make_model = load_minilm_task(args.n_train, args.n_eval)
    result = run_study(args, data, make_model, args.output)
    print(format_table(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
