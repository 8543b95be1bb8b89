"""Entropy-guided FlexLoRA (flexible low-rank adaptation) for the Hugging Face stack.

ΔW = P·diag(λ)·Q adapters whose ranks move between matrices during training, guided by the spectral entropy of λ.

Every public name is resolved on first use (PEP 562), so `import flexlora_hf` imports nothing heavy, and the
adapter core (`config`, `scoring`, `spectrum`, `schedule`, `allocation`, `layer`, `model`, `events`) never pulls in
transformers, peft, bitsandbytes, lm-eval, matplotlib, datasets or huggingface_hub.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._logging import silence_bitsandbytes_import
from .constants import __version__ as __version__

silence_bitsandbytes_import()

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "FlexLoRAArguments": "arguments",
    "FlexLoRACallback": "trainer",
    "FlexLoRAConfig": "config",
    "FlexLoRALayer": "layer",
    "FlexLoRAModel": "model",
    "FlexLoRASFTTrainer": "integrations.trl",  # needs trl (pip install flexlora_hf[trl])
    "FlexLoRATrainer": "trainer",
    "FlexLoRATrainerMixin": "trainer",
    "ReallocationPlan": "allocation",
    "budget_at": "schedule",
    "build_model_card": "model_card",
    "event_steps": "schedule",
    "get_flexlora_model": "model",
    "guard_bnb_cpu": "quantization",
    "importance": "scoring",
    "importance_batched": "scoring",
    "is_event_step": "schedule",
    "load_adapter_into": "io.native",
    "load_flexlora": "model",
    "load_base_model": "quantization",
    "load_peft_view": "warm_start",
    "lora_config_from_pretrained": "transfer",
    "lora_config_from_rank_map": "transfer",
    "plan_reallocation": "allocation",
    "plot_rank_history": "plotting",
    "push_to_hub": "hub",
    "save_flexlora": "io.save",
    "spectral_entropy": "scoring",
    "to_lora_config": "transfer",
    # lm-eval is optional and slow to import
    "FlexLoRALM": "evaluation",
    "evaluate_adapter": "evaluation",
    "prepare_bigbench_eval_data": "evaluation",
    "results_table": "evaluation",
}


__all__ = [
    "FlexLoRAArguments",
    "FlexLoRACallback",
    "FlexLoRAConfig",
    "FlexLoRALayer",
    "FlexLoRAModel",
    "FlexLoRASFTTrainer",
    "FlexLoRATrainer",
    "FlexLoRATrainerMixin",
    "ReallocationPlan",
    "budget_at",
    "build_model_card",
    "event_steps",
    "get_flexlora_model",
    "guard_bnb_cpu",
    "importance",
    "importance_batched",
    "is_event_step",
    "load_adapter_into",
    "load_base_model",
    "load_flexlora",
    "load_peft_view",
    "lora_config_from_pretrained",
    "lora_config_from_rank_map",
    "plan_reallocation",
    "plot_rank_history",
    "push_to_hub",
    "save_flexlora",
    "spectral_entropy",
    "to_lora_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flexlora_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .allocation import ReallocationPlan, plan_reallocation
    from .arguments import FlexLoRAArguments
    from .config import FlexLoRAConfig
    from .evaluation import FlexLoRALM as FlexLoRALM
    from .evaluation import evaluate_adapter as evaluate_adapter
    from .evaluation import prepare_bigbench_eval_data as prepare_bigbench_eval_data
    from .evaluation import results_table as results_table
    from .hub import push_to_hub
    from .integrations.trl import FlexLoRASFTTrainer
    from .io.native import load_adapter_into
    from .io.save import save_flexlora
    from .layer import FlexLoRALayer
    from .model import FlexLoRAModel, get_flexlora_model, load_flexlora
    from .model_card import build_model_card
    from .plotting import plot_rank_history
    from .quantization import guard_bnb_cpu, load_base_model
    from .schedule import budget_at, event_steps, is_event_step
    from .scoring import importance, importance_batched, spectral_entropy
    from .trainer import FlexLoRACallback, FlexLoRATrainer, FlexLoRATrainerMixin
    from .transfer import lora_config_from_pretrained, lora_config_from_rank_map, to_lora_config
    from .warm_start import load_peft_view
