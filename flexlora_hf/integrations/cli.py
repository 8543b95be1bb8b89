"""The `flexlora-hf` command line (the console script `flexlora-hf = "flexlora_hf.integrations.cli:main"`).

Subcommands:

* `flexlora-hf eval --base B --adapter A --tasks T1,T2 [--load_in_4bit] [--limit N] [--output_dir D] ...`:
  scores an adapter with lm-eval ([`flexlora_hf.evaluate_adapter`]) and prints a per-task table with the average;
  with `--output_dir` it also writes `results.md`, `results.json` and lm-eval's full output.
* `flexlora-hf prepare-bigbench [--out_dir D] [--tasks social_iqa,strategyqa] [--limit N]`: writes the held-out
  BIG-bench rows the offline `flexlora_bigbench_*` tasks read.

For every stock lm-eval flag use `python -m flexlora_hf.integrations.evaluation --model flexlora --model_args ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _limit(value: str) -> int | float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("--limit must be > 0")
    return int(number) if number >= 1 and number.is_integer() else number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexlora-hf", description="Entropy-guided FlexLoRA for the Hugging Face stack."
    )
    parser.add_argument("--log_level", default="WARNING", help="Python logging level (default: WARNING).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ev = sub.add_parser("eval", help="Score an adapter with lm-evaluation-harness and print a results table.")
    ev.add_argument("--base", required=True, help="Base model id or folder.")
    ev.add_argument(
        "--adapter",
        default=None,
        help="FlexLoRA adapter folder, exported PEFT folder or Hub id; omit to score the base model alone.",
    )
    ev.add_argument(
        "--tasks",
        required=True,
        help="Comma-separated lm-eval tasks/groups, e.g. "
        "flexlora_bigbench_social_iqa, flexlora_llm_adapters, flexlora_commonsense.",
    )
    ev.add_argument("--load_in_4bit", action="store_true", help="Load the base in 4-bit NF4 (bitsandbytes).")
    ev.add_argument("--limit", type=_limit, default=None, help="Rows per task (fraction if < 1); for quick checks.")
    ev.add_argument("--batch_size", default="1", help="lm-eval batch size (an int, or 'auto' on GPU).")
    ev.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    ev.add_argument("--dtype", default="auto", help="Model dtype (auto = bf16 on CUDA, fp32 on CPU).")
    ev.add_argument("--num_fewshot", type=int, default=None, help="Few-shot examples.")
    ev.add_argument(
        "--include_path",
        action="append",
        default=None,
        help="Extra lm-eval task folder (repeatable); flexlora_hf's own tasks are always included.",
    )
    ev.add_argument(
        "--data_dir",
        default=None,
        help="Data folder for the local-data tasks (LLM-Adapters "
        "'dataset/' folder or the BIG-bench eval JSONL folder), passed as task metadata.",
    )
    ev.add_argument("--metric", default="auto", help="Metric for the table (auto: exact_match, acc_norm, acc).")
    ev.add_argument("--name", default=None, help="Row label in the table (default: the adapter folder name).")
    ev.add_argument("--output_dir", default=None, help="Write results.md, results.json, lm_eval_results.json here.")

    prep = sub.add_parser(
        "prepare-bigbench",
        help="Write the held-out BIG-bench eval rows (JSONL) for the offline flexlora_bigbench_* tasks.",
    )
    prep.add_argument("--out_dir", default=None, help="Destination (default: ~/.cache/flexlora_hf/eval_data).")
    prep.add_argument("--tasks", default="social_iqa,strategyqa", help="Comma-separated BIG-bench tasks.")
    prep.add_argument("--limit", type=int, default=None, help="Keep the first N eval rows per task.")
    return parser


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_adapter, results_table

    batch_size: int | str = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    start = time.perf_counter()
    results = evaluate_adapter(
        args.base,
        args.adapter,
        args.tasks,
        load_in_4bit=args.load_in_4bit,
        limit=args.limit,
        batch_size=batch_size,
        device=args.device,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        dtype=args.dtype,
        metadata={"data_dir": args.data_dir} if args.data_dir else None,
    )
    elapsed = time.perf_counter() - start
    if not results:
        return 0
    name = args.name or (os.path.basename(os.path.normpath(args.adapter)) if args.adapter else "base")
    markdown, _ = results_table(results, metric=args.metric, name=name, output_dir=args.output_dir)
    if args.output_dir:
        with open(os.path.join(args.output_dir, "lm_eval_results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    print(markdown)  # noqa: T201 - the table is the command's output
    print(f"({elapsed:.1f} s)")  # noqa: T201
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from .tasks.utils import prepare_bigbench_eval_data

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    written = prepare_bigbench_eval_data(args.out_dir, tasks, args.limit)
    for task, path in written.items():
        print(f"{task}: {path}")  # noqa: T201
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `flexlora-hf`. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "prepare-bigbench":
        return _run_prepare(args)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
