#!/usr/bin/env python
"""Rebuild ``examples/data/topics/task.json``, the quickstart's embedded default dataset.

The source is the English part of chatterbot-corpus 1.3.3 (BSD-3-Clause, Gunther Cox), fetched from PyPI with
``pip download --no-deps chatterbot-corpus==1.3.3``. Every conversation turn of at least three words becomes one
example labelled with the topic of its file; duplicates (case-insensitive) are kept once, in file order. The output
uses the BIG-bench ``task.json`` layout (``input`` + one-hot ``target_scores``), so the same loader reads it.

Usage::

    python examples/data/build_topics.py            # downloads the wheel with pip into a temporary folder
    python examples/data/build_topics.py --wheel chatterbot_corpus-1.3.3-py2.py3-none-any.whl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

VERSION = "1.3.3"
# Topic files with at least a dozen distinct turns; trivia (mixed topics), tech_support (one long script),
# greetings, gossip, humor, botprofile and conversations (small talk) are left out as not topical.
TOPICS = ("ai", "coding", "computers", "emotion", "food", "history", "literature", "money", "movies", "politics",
          "psychology", "science", "sports")
OUT = Path(__file__).resolve().parent / "topics" / "task.json"


def build(wheel: Path) -> dict:
    examples, seen = [], set()
    with zipfile.ZipFile(wheel) as zf:
        for topic in TOPICS:
            data = yaml.safe_load(zf.read(f"chatterbot_corpus/data/english/{topic}.yml"))
            for conversation in data["conversations"]:
                for turn in conversation:
                    text = " ".join(str(turn).split())
                    if len(text.split()) < 3 or text.lower() in seen:
                        continue
                    seen.add(text.lower())
                    examples.append({"input": text, "target_scores": {t: int(t == topic) for t in TOPICS}})
    return {
        "name": "chatterbot_topics",
        "description": "Which topic does this conversation turn belong to? (chatterbot-corpus English, "
                       f"version {VERSION}, BSD-3-Clause; built by examples/data/build_topics.py)",
        "keywords": ["text classification", "topic"],
        "examples": examples,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheel", type=Path, default=None, help="A local chatterbot_corpus wheel (else pip download).")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"chatterbot-corpus=={VERSION}",
                            "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("chatterbot_corpus-*.whl"))
        task = build(wheel)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # one example per line: readable diffs, a small file
    head = {k: v for k, v in task.items() if k != "examples"}
    lines = [json.dumps(ex, ensure_ascii=False, separators=(",", ":")) for ex in task["examples"]]
    body = json.dumps(head, ensure_ascii=False)[:-1] + ', "examples": [\n' + ",\n".join(lines) + "\n]}\n"
    OUT.write_text(body)
    print(f"{OUT}: {len(task['examples'])} examples over {len(TOPICS)} topics")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
