"""Entropy-guided FlexLoRA (flexible low-rank adaptation) for the Hugging Face stack.

ΔW = P·diag(λ)·Q adapters whose ranks move between matrices during training, guided by the spectral entropy of λ.
"""

from .allocation import ReallocationPlan, plan_reallocation
from .config import FlexLoRAConfig
from .importance import importance, importance_batched, spectral_entropy
from .layer import FlexLoRALayer
from .model import FlexLoRAModel, get_flexlora_model
from .schedule import budget_at, event_steps, is_event_step
from .trainer import FlexLoRACallback, FlexLoRATrainer, FlexLoRATrainerMixin

__version__ = "0.1.0"

__all__ = [
    "FlexLoRACallback",
    "FlexLoRAConfig",
    "FlexLoRALayer",
    "FlexLoRAModel",
    "FlexLoRATrainer",
    "FlexLoRATrainerMixin",
    "ReallocationPlan",
    "budget_at",
    "event_steps",
    "get_flexlora_model",
    "importance",
    "importance_batched",
    "is_event_step",
    "plan_reallocation",
    "spectral_entropy",
]
