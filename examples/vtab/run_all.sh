#!/usr/bin/env bash
# All 19 VTAB-1k tasks with the recipe of run_vtab1k.sh, one after the other; extra arguments go to every run.
# Prints the top-1 test accuracy of each task and their mean (the VTAB-1k score) at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/vtab
tasks="$(sed -n 's/^VTAB1K_TASKS="\(.*\)"$/\1/p' "$here/run_vtab1k.sh")"
for task in $tasks; do
  bash "$here/run_vtab1k.sh" "$task" "$@"
done
PYTHON="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ "$PYTHON" = python ] && PYTHON=.venv/bin/python
"$PYTHON" - "$tasks" <<'PY'
import json, sys
from pathlib import Path
scores = {}
for task in sys.argv[1].split():
    path = Path("outputs/vtab1k") / task / "eval_results.json"
    if path.is_file():
        scores[task] = 100 * json.loads(path.read_text())["eval_accuracy"]
for task, acc in scores.items():
    print(f"{task:22s} {acc:5.1f}")
if scores:
    print(f"{'mean':22s} {sum(scores.values()) / len(scores):5.1f} ({len(scores)} of 19 tasks)")
PY
