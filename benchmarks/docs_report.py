"""The one writer of the figures in README.md and docs/benchmarks.md: each is rendered from a result record.

Usage::

    python -m benchmarks.docs_report           # rewrite every generated block from benchmarks/results/
    python -m benchmarks.docs_report --check   # exit 1 when a block differs from what the records give

A generated block is the text between ``<!-- generated: NAME -->`` and ``<!-- /generated: NAME -->`` in a
Markdown file; `BLOCKS` maps (file, NAME) to the function that renders it. Every row names the record it comes from,
and the library version that measured it, so a figure is never copied by hand and never outlives its record. A block
whose record is missing renders as a line saying so (nothing is invented). Prose outside the blocks describes setups
and conclusions in words and restates no figure (tests/test_benchmarks_smoke.py greps for one).

Records written before the runner carried provenance name no library version; the version each renderer prints for
them is the one docs/benchmarks.md has always named for that record (`VERSIONS`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .specs import is_library_default

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# the library version that measured each record that predates provenance
VERSIONS = {
    "cost_smollm2_v04.json": "v0.4",
    "inference_smollm2_v2.json": "v0.2",
    "event_cost_v05.json": "v0.5",
    "event_cost_v06.json": "v0.6",
    "quality_matched_runs.jsonl": "v0.5",
    "decoder_check_intent_loralike.json": "v0.5",
    "decoder_check_intent_v06.json": "v0.6",
    "controls.json": "v0.6",
    "transfer.json": "v0.2",
    "quality.json": "v0.2",
    "archive/decoder_check_intent_loralike_matched.json": "v0.5",
}
# the MiniLM drop-in (v0.5): FlexLoRA's runs at LoRA's rate, against PEFT LoRA's runs of the v0.2 study
DROPIN_FLEXLORA = "flexlora:init_basis=lora_like,lam_lr_ratio=1,lr="
DROPIN_TASKS = ("intent_recognition", "multiemo", "logical_fallacy_detection")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _load_runs(name: str) -> list[dict[str, Any]] | None:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None


def _missing(name: str) -> str:
    return f"*(no record yet: `benchmarks/results/{name}`)*"


def _iqr(stats: dict[str, Any], bold: bool = False) -> str:
    median = f"{stats['median']:.3f}"
    return f"{'**' + median + '**' if bold else median} [{stats['q25']:.3f}, {stats['q75']:.3f}]"


def _seeds_cell(values: dict[int, float]) -> str:
    """mean ± std (per seed) in %, as `benchmarks.quality` writes it."""
    vals = [values[s] for s in sorted(values)]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.fmean(vals):.1f} ± {100 * std:.1f} ({', '.join(f'{100 * v:.1f}' for v in vals)})"


def _rate(lr: str) -> str:
    """0.002 -> 2e-3"""
    mantissa, exponent = f"{float(lr):.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _count(n: int, what: str) -> str:
    words = ("no", "one", "two", "three", "four", "five")
    return f"{words[n] if n < len(words) else n} {what}{'' if n == 1 else 's'}"


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
    for name, data, rate in (("controls.json", "BIG-bench {task}", "at LoRA's rate"),
                             ("topics.json", "the embedded topic set", "one rate for both")):
        study = _load(name)
        for task, methods in (study or {}).get("custom", {}).items():
            # the library defaults at LoRA's rate, however the spec names them (controls: the study's legacy keys)
            lr = _lora_lr(methods)
            default = next((v for k, v in sorted(methods.items()) if is_library_default(k) and _at(k, lr)), None)
            lora = methods.get(f"lora:lr={lr}")
            if default and lora:
                rows.append(
                    f"| MiniLM-L6, {data.format(task=task)}, {rate}, {default['stats']['n']} seeds "
                    f"| {_pm(default['stats'])} | {_pm(lora['stats'])} | {_study_version(name)} | `{name}` |"
                )
    return "\n".join(rows)


def _study_version(name: str) -> str:
    """The library version that measured a study's report: `VERSIONS` for records that predate provenance, else the
    version its runs name (``v0.7`` for 0.7.x)."""
    if name in VERSIONS:
        return VERSIONS[name]
    runs = _load_runs(name.replace(".json", "_runs.jsonl")) or []
    versions = sorted({".".join(r["provenance"]["flexlora_hf_version"].split(".")[:2]) for r in runs if "provenance" in r})
    return ", ".join(f"v{v}" for v in versions) or "?"


def _at(method: str, lr: str) -> bool:
    return f"lr={lr}" in method.partition(":")[2].split(",")


def _lora_lr(methods: dict[str, Any]) -> str:
    return next((m.split("lr=")[1] for m in methods if m.startswith("lora:lr=")), "?")


# ------------------------------------------------------------------------------------------------- docs/benchmarks.md
def training_step() -> str:
    name = "cost_smollm2_v04.json"
    rec = _load(name)
    if rec is None:
        return _missing(name)
    timing, memory, cfg = rec["timing"], rec["memory"], rec["config"]
    slots = cfg["r"] + cfg["capacity_extra"]

    def peak(method: str) -> str:
        return f"{memory[method]['peak_mib']:.0f} MiB ({memory[method]['peak_ratio_to_lora']:.3f}x)"

    return "\n".join([
        "| method | CPU time per step vs PEFT LoRA, median [IQR] | peak memory | training memory on top of the weights |",
        "|---|---|---|---|",
        f"| PEFT LoRA r {cfg['r']} | 1 | {memory['lora']['peak_mib']:.0f} MiB | 1 |",
        f"| **FlexLoRA** r {cfg['r']}, {slots} slots | {_iqr(timing['flexlora']['cpu_s_ratio_to_lora'], bold=True)} "
        f"| {peak('flexlora')} | {memory['flexlora']['delta_ratio_to_lora']:.3f}x |",
        f"| PEFT AdaLoRA {cfg['adalora_init_r']} -> {cfg['adalora_target_r']} "
        f"| {_iqr(timing['adalora']['cpu_s_ratio_to_lora'])} | {peak('adalora')} "
        f"| {memory['adalora']['delta_ratio_to_lora']:.3f}x |",
        "",
        f"Record: `benchmarks/results/{name}` ({VERSIONS[name]}).",
    ])  # fmt: skip


def inference() -> str:
    name = "inference_smollm2_v2.json"
    rec = _load(name)
    if rec is None:
        return _missing(name)
    t = rec["timing"]
    lora, base = "cpu_s_ratio_to_lora_unmerged", "cpu_s_ratio_to_base"
    diff = f"{rec['merge_checks']['flexlora_merged_vs_unmerged_max_abs']:.1e}".replace("e-0", "e-")
    return "\n".join([
        "| variant | CPU time vs PEFT LoRA unmerged, median [IQR] | vs the base model |",
        "|---|---|---|",
        "| FlexLoRA unmerged, loaded for inference (exactly the active directions) "
        f"| {_iqr(t['flexlora_unmerged'][lora], bold=True)} | {t['flexlora_unmerged'][base]['median']:.3f} |",
        f"| FlexLoRA merged (`merge_and_unload`) | {t['flexlora_merged'][lora]['median']:.3f} "
        f"| {_iqr(t['flexlora_merged'][base], bold=True)} |",
        f"| PEFT LoRA merged | {t['lora_merged'][lora]['median']:.3f} | {t['lora_merged'][base]['median']:.3f} |",
        "",
        f"Merged and unmerged FlexLoRA outputs differ by {diff} (max abs). Record: `benchmarks/results/{name}` "
        f"({VERSIONS[name]}).",
    ])  # fmt: skip


def _dropin() -> list[dict[str, Any]] | None:
    """Per task of the v0.5 MiniLM drop-in: LoRA's rate and both methods' accuracy per seed."""
    flex_runs, lora_runs = _load_runs("quality_matched_runs.jsonl"), _load_runs("quality_runs.jsonl")
    if flex_runs is None or lora_runs is None:
        return None
    rows = []
    for task in DROPIN_TASKS:
        flex = {r["seed"]: r for r in flex_runs if r["task"] == task and r["method"].startswith(DROPIN_FLEXLORA)}
        if not flex:
            continue
        lr = next(iter(flex.values()))["method"].removeprefix(DROPIN_FLEXLORA)
        lora = {r["seed"]: r["accuracy"] for r in lora_runs if r["task"] == task and r["method"] == f"lora:lr={lr}"}
        seeds = sorted(s for s in flex if s in lora)
        rows.append({"task": task, "lr": lr, "flexlora": {s: flex[s]["accuracy"] for s in seeds},
                     "lora": {s: lora[s] for s in seeds}})
    return rows


def minilm_dropin() -> str:
    rows = _dropin()
    if rows is None:
        return _missing("quality_matched_runs.jsonl")
    lines = ["| task (LoRA's rate) | PEFT LoRA | FlexLoRA v0.5 | wins vs LoRA |", "|---|---|---|---|"]
    for row in rows:
        flex, lora = row["flexlora"], row["lora"]
        wins = sum(flex[s] > lora[s] for s in flex)
        ties = sum(flex[s] == lora[s] for s in flex)
        tied = f" ({_count(ties, 'tie')})" if ties else ""
        lines.append(f"| {row['task']} ({_rate(row['lr'])}) | {_seeds_cell(lora)} | {_seeds_cell(flex)} "
                     f"| {wins}/{len(flex)}{tied} |")
    lines += ["", "Records: `benchmarks/results/quality_matched_runs.jsonl` (FlexLoRA, v0.5), "
              "`benchmarks/results/quality_runs.jsonl` (PEFT LoRA, the v0.2 study's runs at the same rate and seeds)."]
    return "\n".join(lines)


def transfer() -> str:
    name = "transfer.json"
    rec = _load(name)
    if rec is None:
        return _missing(name)
    summ = rec["summary"]

    def cell(arm: str) -> str:
        return _seeds_cell(dict(zip(summ[arm]["seeds"], summ[arm]["accuracy"]["values"], strict=True)))

    diff = summ["paired_accuracy_difference"]
    return "\n".join([
        f"| arm (total rank {summ['uniform']['total_rank']}) | accuracy %, mean ± std (per seed) |",
        "|---|---|",
        f"| PEFT LoRA, uniform r {rec['settings']['r']} | {cell('uniform')} |",
        f"| PEFT LoRA with FlexLoRA's rank map | {cell('transferred')} |",
        f"| paired difference (rank map − uniform), points | {_signed(100 * diff['mean'])} ± {100 * diff['std']:.1f} |",
        "",
        f"Record: `benchmarks/results/{name}` ({VERSIONS[name]}).",
    ])  # fmt: skip


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", "−")


# the latest measurement of each ablation, the default of its version beside it: the v0.2 study's (quality.json) per
# task as (variant, what it switches off), then the v0.5 ones (quality_matched_runs.jsonl, and the decoder check)
V02_ABLATIONS = (
    ("intent_recognition", (
        ("importance=nuclear", "the paper's Table 4: importance by the nuclear norm"),
        ("importance=frobenius", "the paper's Table 4: importance by the Frobenius norm"),
        ("allocation=prune_only", "the paper's Table 5: prune only"),
        ("allocation=expand_only", "the paper's Table 5: expand only"),
        ("expansion_init=small", "the paper's Table 6: small random expansion"),
        ("expansion_init=zero", "the paper's Table 6: zero expansion"),
    )),
    ("multiemo", (
        ("init_basis=gaussian,lam_lr_ratio=1,adam_reset=shared_step", "v0.2's three defaults below, all at once"),
        ("init_basis=gaussian", "v0.2 default off: Gaussian basis instead of orthonormal"),
        ("lam_lr_ratio=1", "v0.2 default off: λ at the optimizer's rate instead of 10x"),
        ("adam_reset=shared_step", "v0.2 default off: one shared Adam step instead of each direction's age"),
        ("orth_reg_weight=0", "γ = 0: no eq. 2 term"),
    )),
)  # fmt: skip
V05_DEFAULT = "flexlora:init_basis=lora_like,lam_lr_ratio=1,lr=0.002"
V05_ABLATIONS = (
    ("flexlora:init_basis=orthonormal,lam_lr_ratio=1,lr=0.002", "v0.5 default off: orthonormal start instead of lora_like"),
    ("flexlora:init_basis=lora_like,lam_lr_rule=lora_matched,lam_lr_ratio=1,lr=0.002",
     "v0.5 default off: λ's rate per matrix instead of the single rate"),
)


def ablations() -> str:
    lines = ["| switched off | version | task | accuracy % | that version's default | record |", "|---|---|---|---|---|---|"]
    quality = _load("quality.json")
    for task, variants in V02_ABLATIONS if quality else ():
        rows = quality["ablations"].get(task, {})
        default = rows.get("default", {}).get("stats")
        for variant, what in variants:
            if rows.get(variant, {}).get("stats"):
                lines.append(f"| {what} (`{variant}`) | v0.2 | MiniLM {task} | {_pm(rows[variant]['stats'])} "
                             f"| {_pm(default)} | `quality.json` |")
    runs = _load_runs("quality_matched_runs.jsonl") or []

    def accs(method: str) -> dict[int, float]:
        return {r["seed"]: r["accuracy"] for r in runs if r["task"] == "intent_recognition" and r["method"] == method}

    default = accs(V05_DEFAULT)
    for method, what in V05_ABLATIONS:
        if accs(method) and default:
            lines.append(f"| {what} | v0.5 | MiniLM intent_recognition | {_seeds_cell(accs(method)).split(' (')[0]} "
                         f"| {_seeds_cell(default).split(' (')[0]} | `quality_matched_runs.jsonl` |")
    matched = _decoder_figure("archive/decoder_check_intent_loralike_matched.json")
    v05 = _decoder_figure("decoder_check_intent_loralike.json")
    if matched and v05:
        lines.append(f"| v0.5 default off: λ's rate per matrix instead of the single rate | v0.5 | SmolLM2-135M 4-bit "
                     f"decoder check | {matched[0].split(' vs ')[0]} | {v05[0].split(' vs ')[0]} "
                     "| `archive/decoder_check_intent_loralike_matched.json` |")
    return "\n".join(lines)


def _decoder_figure(name: str) -> tuple[str, str] | None:
    """FlexLoRA's and LoRA's held-out accuracy (recipe format) in a decoder check record, with their seed counts."""
    rec = _load(name)
    if rec is None:
        return None
    acc = rec["scores"][f"flexlora_bigbench_{rec['settings']['task']}_recipe"]["acc"]
    flex, lora = acc["flexlora"]["stats"], acc["lora"]["stats"]
    seeds = f"{flex['n']} seeds" if flex["n"] == lora["n"] else f"FlexLoRA {flex['n']} seeds, LoRA {lora['n']}"
    return f"{_pm(flex)} vs LoRA {_pm(lora)}", seeds


def summary() -> str:
    """One row per question: the current figure and the version that measured it."""
    rows = ["| question | current figure | measured with | details |", "|---|---|---|---|"]

    def row(question: str, name: str, figure: str | None, link: str) -> None:
        rows.append(f"| {question} | {figure if figure is not None else _missing(name)} "
                    f"| {_study_version(name) if figure is not None else '-'} | {link} |")

    cost = _load("cost_smollm2_v04.json")
    row("Training step, CPU time vs PEFT LoRA", "cost_smollm2_v04.json", cost and (
        f"{cost['timing']['flexlora']['cpu_s_ratio_to_lora']['median']:.3f}x "
        f"(AdaLoRA {cost['timing']['adalora']['cpu_s_ratio_to_lora']['median']:.3f}x), "
        f"peak memory {cost['memory']['flexlora']['peak_ratio_to_lora']:.3f}x"), "[Training step](#training-step-v04)")
    event = _load("event_cost_v06.json")
    row("One reallocation event, LLaMA3-8B adapter shapes, CPU", "event_cost_v06.json", event and ", ".join(
        f"{res['event_cpu_ms']['median']:.1f} ms (r {res['r']})" for res in event["results"]),
        "[One event](#v06-reallocation-what-has-been-measured)")
    inf = _load("inference_smollm2_v2.json")
    row("Unmerged inference vs PEFT LoRA; merged vs base", "inference_smollm2_v2.json", inf and (
        f"{inf['timing']['flexlora_unmerged']['cpu_s_ratio_to_lora_unmerged']['median']:.3f}x; "
        f"{inf['timing']['flexlora_merged']['cpu_s_ratio_to_base']['median']:.3f}x"), "[Inference](#inference-v02)")
    dropin = _dropin()
    row("MiniLM-L6, 3 BIG-bench tasks at LoRA's rate (mean %, FlexLoRA vs LoRA)", "quality_matched_runs.jsonl",
        dropin and "; ".join(f"{r['task']} {100 * statistics.fmean(r['flexlora'].values()):.1f} vs "
                             f"{100 * statistics.fmean(r['lora'].values()):.1f}" for r in dropin),
        "[MiniLM drop-in](#quality-minilm-l6-at-loras-learning-rate-v05)")
    row("Reallocation controls, MiniLM-L6 multiemo at LoRA's rate", "controls.json", _controls_figure(),
        "[Controls](#v06-reallocation-what-has-been-measured)")
    row("Reallocation controls and AdaLoRA, MiniLM-L6 on the embedded topic set", "topics.json",
        _controls_figure("topics.json", "topics"), "[Topic set](#controls-adalora-and-tables-4-6-on-the-embedded-topic-set)")
    decoder = _decoder_figure("decoder_check_intent_v06.json")
    row("SmolLM2-135M 4-bit decoder, held-out lm-eval (recipe format)", "decoder_check_intent_v06.json",
        decoder and f"{decoder[0]} ({decoder[1]})", "[Decoder check](#v06-reallocation-what-has-been-measured)")
    tr = _load("transfer.json")
    row("Rank map transferred to a plain LoRA (MiniLM-L6 multiemo)", "transfer.json", tr and (
        f"{_pm(tr['summary']['transferred']['accuracy'])} vs uniform LoRA {_pm(tr['summary']['uniform']['accuracy'])}"),
        "[Rank-map transfer](#rank-map-transfer-v02)")
    rows.append("| GPU | not measured | - | [GPU](#gpu) |")
    return "\n".join(rows)


def _has(method: str, override: str) -> bool:
    """Whether a method spec sets `override` (``b0=0``), whatever its place in the spec."""
    return override in method.partition(":")[2].split(",")


def _controls_figure(name: str = "controls.json", task: str = "multiemo") -> str | None:
    rec = _load(name)
    methods = (rec or {}).get("custom", {}).get(task)
    if not methods:
        return None
    lr = _lora_lr(methods)
    default = next((v for k, v in sorted(methods.items()) if is_library_default(k) and _at(k, lr)), None)
    parts = []
    for label, entry in (
        ("default", default),
        ("no reallocation (b0=0)", next((v for k, v in methods.items() if _has(k, "b0=0")), None)),
        ("random reallocation", next((v for k, v in methods.items() if _has(k, "importance=random")), None)),
        ("LoRA", methods.get(f"lora:lr={lr}")),
        ("AdaLoRA", methods.get(f"adalora:lr={lr}")),
    ):
        if entry:
            parts.append(f"{label} {_pm(entry['stats'])}")
    random = next((v for k, v in methods.items() if _has(k, "importance=random")), None)
    n = default["stats"]["n"] if default else 0
    stability = ""
    if default and default.get("rank_stability") is not None:
        stability = f"; rank-map stability {default['rank_stability']:.2f}"
        if random and random.get("rank_stability") is not None:
            stability += f" (random {random['rank_stability']:.2f})"
    return f"{', '.join(parts)}{stability}; {n} seeds"


def markdown_of(name: str, what: str, section: str | None = None) -> Callable[[], str]:
    """A block that is the `markdown` a benchmark's own `--report` wrote into its record (from the paragraph that
    starts with `section` on, when given: a quality.py study of custom runs only has empty selection tables before)."""

    def render() -> str:
        rec = _load(name)
        if rec is None:
            return f"*(no record yet: `benchmarks/results/{name}`; {what})*"
        text = rec["markdown"].strip()
        if section is not None and section in text:
            text = text[text.index(section):]
        return f"From `benchmarks/results/{name}` ({what}):\n\n{text}"

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
    ("docs/benchmarks.md", "summary"): summary,
    ("docs/benchmarks.md", "decoder-v06"): markdown_of(
        "decoder_check_intent_v06.json", "`python -m benchmarks.decoder_check --report`, v0.6 defaults"
    ),
    ("docs/benchmarks.md", "controls"): markdown_of(
        "controls.json", "`python -m benchmarks.run --report controls`", section="Custom runs"
    ),
    ("docs/benchmarks.md", "deviations-v06"): markdown_of(
        "ablations_v06.json", "`python -m benchmarks.run --report deviations_v06`", section="Custom runs"
    ),
    ("docs/benchmarks.md", "topics"): markdown_of(
        "topics.json", "`python -m benchmarks.run --report topics`", section="Custom runs"
    ),
    ("docs/benchmarks.md", "event-cost"): event_cost,
    ("docs/benchmarks.md", "training-step"): training_step,
    ("docs/benchmarks.md", "inference"): inference,
    ("docs/benchmarks.md", "minilm-dropin"): minilm_dropin,
    ("docs/benchmarks.md", "transfer"): transfer,
    ("docs/benchmarks.md", "ablations"): ablations,
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
