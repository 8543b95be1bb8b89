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

from ._compat import install_module_aliases, moved_module
from ._logging import silence_bitsandbytes_import
from .constants import __version__ as __version__

silence_bitsandbytes_import()
install_module_aliases()

# public name -> submodule that defines it: what a LoRA user needs (config, model, loader, trainers, 4-bit base,
# lm-eval entry, rank transfer). The math lives in `flexlora_hf.functional`, the rest in its own module.
_EXPORTS: dict[str, str] = {
    "FlexLoRAArguments": "integrations.arguments",
    "FlexLoRACallback": "integrations.trainer",
    "FlexLoRAConfig": "config",
    "FlexLoRAModel": "adapter.model",
    "FlexLoRASFTTrainer": "integrations.trl",  # needs trl (pip install flexlora_hf[trl])
    "FlexLoRATrainer": "integrations.trainer",
    "FlexLoRATrainerMixin": "integrations.trainer",
    "evaluate_adapter": "integrations.evaluation",  # needs lm-eval (pip install flexlora_hf[eval])
    "get_flexlora_model": "adapter.model",
    "load_base_model": "adapter.quantization",
    "load_flexlora": "adapter.model",
    "to_lora_config": "io.transfer",
}

# Top-level names kept for one release with a FutureWarning: name -> the module to import it from.
_DEPRECATED: dict[str, str] = {
    "FlexLoRALayer": "adapter.layer",
    "ReallocationPlan": "functional",
    "budget_at": "functional",
    "event_steps": "functional",
    "importance": "functional",
    "importance_batched": "functional",
    "is_event_step": "functional",
    "plan_reallocation": "functional",
    "spectral_entropy": "functional",
    "build_model_card": "io.model_card",
    "guard_bnb_cpu": "adapter.quantization",
    "load_adapter_into": "io.native",
    "load_peft_view": "io.warm_start",
    "lora_config_from_pretrained": "io.transfer",
    "lora_config_from_rank_map": "io.transfer",
    "plot_rank_history": "io.plotting",
    "push_to_hub": "io.hub",
    "save_flexlora": "io.save",
    "FlexLoRALM": "integrations.evaluation",
    "prepare_bigbench_eval_data": "integrations.evaluation",
    "results_table": "integrations.evaluation",
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
        moved = moved_module(name)  # an old module path, e.g. `flexlora_hf.trainer` (warns)
        if moved is not None:
            return moved
        raise AttributeError(f"module 'flexlora_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .adapter.model import FlexLoRAModel as FlexLoRAModel
    from .adapter.model import get_flexlora_model as get_flexlora_model
    from .adapter.model import load_flexlora as load_flexlora
    from .adapter.quantization import load_base_model as load_base_model
    from .config import FlexLoRAConfig as FlexLoRAConfig
    from .integrations.arguments import FlexLoRAArguments as FlexLoRAArguments
    from .integrations.evaluation import evaluate_adapter as evaluate_adapter
    from .integrations.trainer import FlexLoRACallback as FlexLoRACallback
    from .integrations.trainer import FlexLoRATrainer as FlexLoRATrainer
    from .integrations.trainer import FlexLoRATrainerMixin as FlexLoRATrainerMixin
    from .integrations.trl import FlexLoRASFTTrainer as FlexLoRASFTTrainer
    from .io.transfer import to_lora_config as to_lora_config
