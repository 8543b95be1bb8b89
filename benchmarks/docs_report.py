"""The one writer of the figures in README.md and docs/benchmarks.md: each is rendered from a result record.

Usage::

    python -m benchmarks.docs_report           # rewrite every generated block from benchmarks/results/
    python -m benchmarks.docs_report --check   # exit 1 when a block differs from what the records give

A generated block is the text between ``<!-- generated: NAME -->`` and ``<!-- /generated: NAME -->`` in a
Markdown file; `BLOCKS` maps (file, NAME) to the function that renders it. Every row names the record it comes from,
and the library version that measured it, so a figure is never copied by hand and never outlives its record. A block
whose record is missing renders as a line saying so (nothing is invented).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .specs import is_library_default

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pm(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _decoder_row(name: str, version: str) -> list[str]:
    rec = _load(name)
    if rec is None:
        return []
    acc = rec["scores"][f"flexlora_bigbench_{rec['settings']['task']}_recipe"]["acc"]
    flex, lora = acc.get("flexlora", {}), acc.get("lora", {})
    n = flex.get("stats", {}).get("n", 0) if flex else 0
    m = lora.get("stats", {}).get("n", 0) if lora else 0
    seeds = f"{n} seeds" if n == m else f"{n} seeds (LoRA {m})"
    return [
        f"| SmolLM2-135M 4-bit, held-out {rec['settings']['task']} (lm-eval acc), {seeds}, at LoRA's rate "
        f"| {_pm(flex.get('stats'))} | {_pm(lora.get('stats'))} | {version} | `{name}` |"
    ]


def headline() -> str:
    rows = ["| measurement | FlexLoRA | PEFT LoRA | measured with | record |", "|---|---|---|---|---|"]
    cost = _load("cost_smollm2_v04.json")
    if cost:
        ratio = cost["timing"]["flexlora"]["step_s_ratio_to_lora"]["median"]
        rows.append(f"| Training step time, SmolLM2-135M, CPU | {ratio:.3f}x | 1 | v0.4 | `cost_smollm2_v04.json` |")
    inference = _load("inference_smollm2_v2.json")
    if inference:
        ratio = inference["timing"]["flexlora_unmerged"]["cpu_s_ratio_to_lora_unmerged"]["median"]
        rows.append(f"| Unmerged inference CPU time, SmolLM2-135M | {ratio:.3f}x | 1 | v0.2 | `inference_smollm2_v2.json` |")
    rows += _decoder_row("decoder_check_intent_loralike.json", "v0.5")
    rows += _decoder_row("decoder_check_intent_v06.json", "v0.6")
    controls = _load("controls.json")
    for task, methods in (controls or {}).get("custom", {}).items():
        # the library defaults at LoRA's rate, however the spec names them (the records: with the study's legacy keys)
        lr = _lora_lr(methods)
        default = next(
            (v for k, v in sorted(methods.items()) if is_library_default(k) and f"lr={lr}" in k.partition(":")[2].split(",")),
            None,
        )
        lora = methods.get(f"lora:lr={lr}")
        if default and lora:
            rows.append(
                f"| MiniLM-L6, BIG-bench {task}, at LoRA's rate, {default['stats']['n']} seeds "
                f"| {_pm(default['stats'])} | {_pm(lora['stats'])} | v0.6 | `controls.json` |"
            )
    return "\n".join(rows)


def _lora_lr(methods: dict[str, Any]) -> str:
    return next((m.split("lr=")[1] for m in methods if m.startswith("lora:lr=")), "?")


def markdown_of(name: str, what: str) -> Callable[[], str]:
    """A block that is the `markdown` a benchmark's own `--report` wrote into its record."""

    def render() -> str:
        rec = _load(name)
        if rec is None:
            return f"*(no record yet: `benchmarks/results/{name}`; {what})*"
        return f"From `benchmarks/results/{name}` ({what}):\n\n{rec['markdown'].strip()}"

    return render


def event_cost() -> str:
    lines = [
        "| r | library | event, CPU ms (median) | importance, CPU ms | apply_plan, CPU ms | record |",
        "|---|---|---|---|---|---|",
    ]
    runs = (("event_cost_v05.json", "v0.5 (sizes \\|λ\\|·‖p‖·‖q‖)"), ("event_cost_v06.json", "v0.6 (ΔW's spectrum)"))
    for name, version in runs:
        rec = _load(name)
        for res in (rec or {}).get("results", []):
            b = res["breakdown_cpu_ms"]
            lines.append(
                f"| {res['r']} | {version} | {res['event_cpu_ms']['median']:.1f} | {b['importance']['median']:.1f} "
                f"| {b['apply_plan']['median']:.1f} | `{name}` |"
            )
    return "\n".join(lines)


BLOCKS: dict[tuple[str, str], Callable[[], str]] = {
    ("README.md", "headline"): headline,
    ("docs/benchmarks.md", "decoder-v06"): markdown_of(
        "decoder_check_intent_v06.json", "`python -m benchmarks.decoder_check --report`, v0.6 defaults"
    ),
    ("docs/benchmarks.md", "controls"): markdown_of("controls.json", "`python -m benchmarks.quality --report`"),
    ("docs/benchmarks.md", "event-cost"): event_cost,
}


def render_file(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- /generated: {re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no generated block {name!r}: add '<!-- generated: {name} -->' ... '<!-- /generated: {name} -->'")
        text = pattern.sub(lambda m, body=body: m.group(1) + body.rstrip() + "\n" + m.group(2), text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.docs_report", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="Only compare; exit 1 if a block is stale.")
    args = p.parse_args(argv)
    stale = []
    for rel in sorted({f for f, _ in BLOCKS}):
        path = ROOT / rel
        text = path.read_text()
        new = render_file(text, {name: fn() for (f, name), fn in BLOCKS.items() if f == rel})
        if new != text:
            stale.append(rel)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale generated blocks in {', '.join(stale)}: run python -m benchmarks.docs_report", file=sys.stderr)
        return 1
    print(("up to date" if not stale else f"rewrote {', '.join(stale)}") if not args.check else "up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
