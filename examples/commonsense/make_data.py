#!/usr/bin/env python
"""Build a small commonsense_170k-format training file from BIG-bench, fully offline (for `smollm2_cpu.sh`).

Takes the *training* part of BIG-bench multiple-choice tasks (every row except the held-out 0, 5, 10, ... rows that
the offline lm-eval tasks `flexlora_bigbench_<task>` score, see `flexlora_hf.integrations.tasks.utils.bigbench_train_eval_split`)
and writes them as the JSON list LLM-Adapters' `commonsense_170k.json` uses:

    {"instruction": "Please choose the correct answer to the question: ...\\n\\nAnswer1: ... Answer2: ... Answer3: ...
                     \\n\\nAnswer format: answer1/answer2/answer3",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"}

(Yes/No tasks such as strategyqa take LLM-Adapters' BoolQ form with `true`/`false` answers.)

The BIG-bench archive is found or downloaded once by `flexlora_hf.data.bigbench` (`~/.cache/flexlora_hf/bigbench`).

    python make_data.py --output data/bigbench_social_iqa_train.json --tasks social_iqa --max_examples 512
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys

from flexlora_hf.integrations.tasks.utils import bigbench_to_commonsense, bigbench_train_eval_split

logger = logging.getLogger("make_data")


def make_rows(tasks: list[str], max_examples: int | None = None, seed: int = 42) -> list[dict[str, str]]:
    """Training rows of `tasks` in commonsense_170k format, shuffled with `seed`, at most `max_examples`."""
    rows: list[dict[str, str]] = []
    for task in tasks:
        train, held = bigbench_train_eval_split(task)
        converted = bigbench_to_commonsense(train)
        logger.info("%s: %d training rows (%d held out for evaluation)", task, len(converted), len(held))
        rows.extend(converted)
    random.Random(seed).shuffle(rows)
    return rows[:max_examples] if max_examples is not None else rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="Destination .json file.")
    parser.add_argument(
        "--tasks", default="social_iqa", help="Comma-separated BIG-bench tasks (social_iqa, strategyqa, multiemo, intent_recognition)."
    )
    parser.add_argument("--max_examples", type=int, default=None, help="Keep at most this many rows.")
    parser.add_argument("--seed", type=int, default=42, help="Shuffle seed.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rows = make_rows([t.strip() for t in args.tasks.split(",") if t.strip()], args.max_examples, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    logger.info("Wrote %d rows to %s", len(rows), args.output)
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])
