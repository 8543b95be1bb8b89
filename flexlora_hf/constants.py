"""File names, environment variables and the cache root: the names every other module agrees on.

Pure constants (standard library only), so the adapter core, the I/O layer, the Hub code and the examples can all
import them without pulling anything else in.
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.7.0"

# ------------------------------------------------------------------------------------------------------ numerics
# Values that were config fields until 0.7.0 (config.REMOVED_FIELDS maps the old keys to them).
ENTROPY_EPS = 1e-12  # ε of eq. 3: keeps log(p) finite for a zero singular value
GAUSSIAN_INIT_STD = 0.02  # std of the gaussian basis (init_basis="gaussian"): AdaLoRA's
SMALL_INIT_VALUE = 1e-3  # λ of a new direction under expansion_init="small" (Table 6)

# ---------------------------------------------------------------------------------------------- the adapter folder
CONFIG_NAME = "flexlora_config.json"
FLEXLORA_CONFIG_NAME = CONFIG_NAME
FLEXLORA_WEIGHTS_NAME = "flexlora_adapter.safetensors"
RANK_MAP_NAME = "rank_map.json"
RANK_HISTORY_NAME = "rank_history.json"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
HEATMAP_NAME = "rank_heatmap.png"
MODEL_CARD_NAME = "README.md"

MODULES_TO_SAVE_PREFIX = "modules_to_save."
# PeftModel wraps the base model as `base_model` (LoraModel) whose `model` is the transformers model; saved keys
# carry this prefix and no adapter name (PEFT 0.21 `get_peft_model_state_dict`).
PEFT_KEY_PREFIX = "base_model.model."

# Files `load_flexlora` needs (fetched from the Hub); the PEFT view, card and picture are not read back.
NATIVE_FILES = (FLEXLORA_CONFIG_NAME, FLEXLORA_WEIGHTS_NAME, RANK_MAP_NAME, RANK_HISTORY_NAME)

# -------------------------------------------------------------------------------------------------------- caching
CACHE_ENV = "FLEXLORA_HF_CACHE"
"""Environment variable that moves the cache root (BIG-bench archive, offline models, lm-eval data)."""


def cache_root() -> Path:
    """`$FLEXLORA_HF_CACHE`, else `~/.cache/flexlora_hf` (user-expanded)."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "flexlora_hf")).expanduser()
