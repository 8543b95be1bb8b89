#!/usr/bin/env bash
# All eight GLUE tasks of the paper's Table 1 / Table 8, one after the other (DeBERTaV3-base; Hub + GPU).
#   bash examples/glue_recipes/run_all.sh [extra run_glue.py arguments, applied to every task]
set -euo pipefail
here="$(dirname "$0")"
for task in cola mrpc rte stsb sst2 qnli qqp mnli; do
  bash "$here/run_glue_paper.sh" "$task" "$@"
done
