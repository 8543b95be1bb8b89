"""Entropy-guided FlexLoRA (flexible low-rank adaptation) for the Hugging Face stack.

ΔW = P·diag(λ)·Q adapters whose ranks move between matrices during training, guided by the spectral entropy of λ.
"""

from .allocation import ReallocationPlan, plan_reallocation
from .arguments import FlexLoRAArguments
from .config import FlexLoRAConfig
from .hub import push_to_hub
from .importance import importance, importance_batched, spectral_entropy
from .layer import FlexLoRALayer
from .model import FlexLoRAModel, get_flexlora_model
from .model_card import build_model_card
from .plotting import plot_rank_history
from .quantization import guard_bnb_cpu, load_base_model
from .schedule import budget_at, event_steps, is_event_step
from .serialization import load_adapter_into, load_flexlora, save_flexlora
from .trainer import FlexLoRACallback, FlexLoRATrainer, FlexLoRATrainerMixin

__version__ = "0.1.0"

__all__ = [
    "FlexLoRAArguments",
    "FlexLoRACallback",
    "FlexLoRAConfig",
    "FlexLoRALayer",
    "FlexLoRAModel",
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
    "load_flexlora",
    "load_base_model",
    "plan_reallocation",
    "plot_rank_history",
    "push_to_hub",
    "save_flexlora",
    "spectral_entropy",
]

# lm-eval is optional and slow to import: the evaluation API is resolved on first use.
_LAZY = {"evaluate_adapter", "results_table", "prepare_bigbench_eval_data", "FlexLoRALM"}


def __getattr__(name: str):  # noqa: ANN202 -- PEP 562 module attribute hook
    if name in _LAZY:
        from . import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module 'flexlora_hf' has no attribute {name!r}")
