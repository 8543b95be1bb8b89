"""Entropy-guided FlexLoRA (flexible low-rank adaptation) for the Hugging Face stack.

ΔW = P·diag(λ)·Q adapters whose ranks move between matrices during training, guided by the spectral entropy of
each ΔW's singular values. The top level holds what a LoRA user needs; the math is in `flexlora_hf.functional`.

Every public name is resolved on first use (PEP 562), so `import flexlora_hf` imports nothing heavy, and the
adapter core (`config`, `scoring`, `spectrum`, `schedule`, `allocation`, `layer`, `model`, `events`) never pulls in
transformers, peft, bitsandbytes, lm-eval, matplotlib, datasets or huggingface_hub.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._logging import silence_bitsandbytes_import
from .constants import __version__ as __version__

silence_bitsandbytes_import()

# public name -> submodule that defines it: what a LoRA user needs (config, model, loader, trainers, 4-bit base,
# lm-eval entry, rank transfer). The math lives in `flexlora_hf.functional`, the rest in its own module.
_EXPORTS: dict[str, str] = {
    "FlexLoRAArguments": "arguments",
    "FlexLoRACallback": "trainer",
    "FlexLoRAConfig": "config",
    "FlexLoRAModel": "model",
    "FlexLoRASFTTrainer": "integrations.trl",  # needs trl (pip install flexlora_hf[trl])
    "FlexLoRATrainer": "trainer",
    "FlexLoRATrainerMixin": "trainer",
    "evaluate_adapter": "evaluation",  # needs lm-eval (pip install flexlora_hf[eval])
    "get_flexlora_model": "model",
    "load_base_model": "quantization",
    "load_flexlora": "model",
    "to_lora_config": "transfer",
}

# Top-level names kept for one release with a FutureWarning: name -> the module to import it from.
_DEPRECATED: dict[str, str] = {
    "FlexLoRALayer": "layer",
    "ReallocationPlan": "functional",
    "budget_at": "functional",
    "event_steps": "functional",
    "importance": "functional",
    "importance_batched": "functional",
    "is_event_step": "functional",
    "plan_reallocation": "functional",
    "spectral_entropy": "functional",
    "build_model_card": "model_card",
    "guard_bnb_cpu": "quantization",
    "load_adapter_into": "io.native",
    "load_peft_view": "warm_start",
    "lora_config_from_pretrained": "transfer",
    "lora_config_from_rank_map": "transfer",
    "plot_rank_history": "plotting",
    "push_to_hub": "hub",
    "save_flexlora": "io.save",
    "FlexLoRALM": "evaluation",
    "prepare_bigbench_eval_data": "evaluation",
    "results_table": "evaluation",
}

_OPTIONAL = ("FlexLoRASFTTrainer", "evaluate_adapter")  # importable by name; `import *` must not need trl / lm-eval
__all__ = sorted(set(_EXPORTS) - set(_OPTIONAL))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None and name in _DEPRECATED:
        module = _DEPRECATED[name]
        warnings.warn(
            f"`flexlora_hf.{name}` is deprecated and will be removed from the top level in the next release; import "
            f"it from its module: `from flexlora_hf.{module} import {name}`.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{module}", __name__), name)  # not cached: each use warns
    if module is None:
        raise AttributeError(f"module 'flexlora_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .arguments import FlexLoRAArguments as FlexLoRAArguments
    from .config import FlexLoRAConfig as FlexLoRAConfig
    from .evaluation import evaluate_adapter as evaluate_adapter
    from .integrations.trl import FlexLoRASFTTrainer as FlexLoRASFTTrainer
    from .model import FlexLoRAModel as FlexLoRAModel
    from .model import get_flexlora_model as get_flexlora_model
    from .model import load_flexlora as load_flexlora
    from .quantization import load_base_model as load_base_model
    from .trainer import FlexLoRACallback as FlexLoRACallback
    from .trainer import FlexLoRATrainer as FlexLoRATrainer
    from .trainer import FlexLoRATrainerMixin as FlexLoRATrainerMixin
    from .transfer import to_lora_config as to_lora_config
