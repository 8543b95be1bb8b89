#!/usr/bin/env bash
# The GPU check, ready for the day a GPU is lent: bash benchmarks/gpu_check.sh OUT_DIR [--device cpu]
# Needs torch, transformers, peft, accelerate, safetensors and this project (installed, or on PYTHONPATH: it runs from
# the repository root). A bitsandbytes wheel may be passed with BNB_WHEEL=path.whl (installed with --no-deps first);
# without bitsandbytes the 4-bit part is skipped with a clear line. Writes JSON + summary.md into OUT_DIR.
# Sized for under 8 minutes on one modern GPU; --device cpu is the small smoke test that CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--device cpu]}"
shift
if [ -n "${BNB_WHEEL:-}" ]; then
  python -m pip install --no-deps --no-index "$BNB_WHEEL" >/dev/null
fi
python -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m benchmarks.gpu_check "$out" "$@"
