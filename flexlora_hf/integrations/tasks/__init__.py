"""lm-evaluation-harness task configs shipped with flexlora_hf (pass `TASKS_DIR` as lm-eval's `include_path`).

* `commonsense/`: group `flexlora_commonsense`, the paper's eight commonsense tasks as stock lm-eval tasks
  (log-likelihood acc / acc_norm; the data comes from the Hugging Face Hub).
* `llm_adapters/`: `flexlora_llm_adapters_<dataset>` and group `flexlora_llm_adapters`, the LLM-Adapters protocol
  of the paper's Table 2 (Alpaca prompt, beam-search generation, regex answer extraction, exact match) over the
  local LLM-Adapters test files (see `utils.LLM_ADAPTERS_DATA_ENV`).
* `bigbench/`: `flexlora_bigbench_social_iqa` and `flexlora_bigbench_strategyqa` (tag `flexlora_bigbench`),
  log-likelihood multiple choice over BIG-bench data that works fully offline (see `utils.EVAL_DATA_ENV`), and
  `flexlora_bigbench_social_iqa_recipe`, `flexlora_bigbench_strategyqa_recipe` (tag `flexlora_bigbench_recipe`):
  the same held-out rows in the commonsense recipe's format (LLM-Adapters prompt listing the options, answer tokens
  `answer1`... / `true`, `false` as choices), i.e. scored the way `examples/commonsense/finetune.py` trains.

The Python the YAML files point to lives in `flexlora_hf.integrations.tasks.utils`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]
