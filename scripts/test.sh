#!/usr/bin/env bash
# The project's test command (README, .ci/run and the GitHub workflow all call this).
# Installs everything into ./.venv, lints the package, then runs the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests on the real small models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
ruff check flexlora_hf tests examples benchmarks
mypy flexlora_hf
python -m pytest "$@"
