"""Results tables for lm-eval runs: per-task columns in the order of the paper's Table 2, plus the average.

Pure formatting of lm-eval's result dicts (no lm-eval import), so tables can be built from saved JSON anywhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: lm-eval task name -> column title, in the order of the paper's Table 2 (stock, LLM-Adapters and BIG-bench names).
DISPLAY_NAMES: dict[str, str] = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "social_iqa": "SIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
    "flexlora_llm_adapters_boolq": "BoolQ",
    "flexlora_llm_adapters_piqa": "PIQA",
    "flexlora_llm_adapters_social_i_qa": "SIQA",
    "flexlora_llm_adapters_hellaswag": "HellaS.",
    "flexlora_llm_adapters_winogrande": "WinoG.",
    "flexlora_llm_adapters_arc_easy": "ARC-e",
    "flexlora_llm_adapters_arc_challenge": "ARC-c",
    "flexlora_llm_adapters_openbookqa": "OBQA",
    "flexlora_bigbench_social_iqa": "BB SIQA",
    "flexlora_bigbench_strategyqa": "BB StrategyQA",
    "flexlora_bigbench_social_iqa_recipe": "BB SIQA (recipe)",
    "flexlora_bigbench_strategyqa_recipe": "BB StrategyQA (recipe)",
}
_COLUMNS = list(dict.fromkeys(DISPLAY_NAMES.values()))  # column titles in table order
#: metrics tried in order when `results_table(metric="auto")`
AUTO_METRICS = ("exact_match", "acc_norm", "acc")


def _pick_metric(task_results: Mapping[str, Any], metric: str) -> str | None:
    candidates = AUTO_METRICS if metric == "auto" else (metric,)
    for name in candidates:
        for key in task_results:
            if key.split(",")[0] == name and not key.split(",")[0].endswith("_stderr"):
                return key
    return None


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def results_table(
    results: Mapping[str, Any],
    *,
    metric: str = "auto",
    name: str = "FlexLoRA",
    output_dir: str | os.PathLike[str] | None = None,
    scale: float = 100.0,
) -> tuple[str, dict[str, Any]]:
    """Per-task scores plus their unweighted average, as a Table-2-style markdown row and a dict.

    Groups (e.g. `flexlora_llm_adapters`) are not counted twice: only leaf tasks enter the average.

    Args:
        results (`Mapping`): what [`evaluate_adapter`] / `lm_eval.simple_evaluate` returned.
        metric (`str`, *optional*, defaults to `"auto"`): metric name, or `auto` = the first of `exact_match`,
            `acc_norm`, `acc` the task reports.
        name (`str`, *optional*, defaults to `"FlexLoRA"`): row label.
        output_dir (`str`, *optional*): if given, write `results.md` and `results.json` there.
        scale (`float`, *optional*, defaults to 100): multiply scores (percent, as in the paper).

    Returns:
        `tuple[str, dict]`: the markdown text and `{"name", "tasks": {task: {"metric", "value", "stderr",
        "n"}}, "average"}`.
    """
    per_task = dict(results.get("results", {}))
    groups = set(results.get("groups", {}) or {})
    n_samples = results.get("n-samples", {}) or {}
    rows: dict[str, dict[str, Any]] = {}

    def order(task: str) -> tuple[int, str]:
        title = DISPLAY_NAMES.get(task)
        return (_COLUMNS.index(title) if title in _COLUMNS else len(_COLUMNS), task)

    for task in sorted(per_task, key=order):
        if task in groups:
            continue
        values = per_task[task]
        key = _pick_metric(values, metric)
        if key is None:
            logger.warning("results_table: task %s reports none of %s; skipped.", task, metric)
            continue
        metric_name, _, filt = key.partition(",")
        stderr = values.get(f"{metric_name}_stderr,{filt}")
        value = values[key]
        rows[task] = {
            "metric": metric_name,
            "value": None if value is None else float(value) * scale,
            "stderr": None if not isinstance(stderr, (int, float)) else float(stderr) * scale,
            "n": (n_samples.get(task) or {}).get("effective"),
        }
    scored = [r["value"] for r in rows.values() if r["value"] is not None]
    average = sum(scored) / len(scored) if scored else None
    summary: dict[str, Any] = {"name": name, "tasks": rows, "average": average}

    titles = [DISPLAY_NAMES.get(t, t) for t in rows]
    lines = [
        "| Method | " + " | ".join(titles) + " | Avg. |",
        "|---|" + "---:|" * (len(rows) + 1),
        f"| {name} | " + " | ".join(_fmt(r["value"]) for r in rows.values()) + f" | {_fmt(average)} |",
        "",
        "| Task | Metric | Score | ± stderr | N |",
        "|---|---|---:|---:|---:|",
    ]
    for task, r in rows.items():
        lines.append(f"| {task} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['stderr'])} | {r['n'] or ''} |")
    markdown = "\n".join(lines) + "\n"

    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(markdown, encoding="utf-8")
        with (out / "results.json").open("w", encoding="utf-8") as f:
            json.dump({**summary, "lm_eval_results": per_task, "n-samples": n_samples}, f, indent=2, default=str)
        logger.info("Wrote %s and %s", out / "results.md", out / "results.json")
    return markdown, summary


# -------------------------------------------------------------------------------------------------- lm-eval CLI
