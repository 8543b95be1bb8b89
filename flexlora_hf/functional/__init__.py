"""The pure math of FlexLoRA in one namespace: spectra, importance (eq. 3), the budget (eq. 4) and the plan (Alg. 1).

Every function here takes tensors or plain Python values and returns new ones: no `nn.Module`, no Trainer, no
state. They are what `FlexLoRAModel` calls at an event, exposed for research and for custom loops that want to
inspect or replay a decision:

```python
>>> import torch
>>> from flexlora_hf import functional as F
>>> P, lam, Q = torch.randn(64, 8), torch.rand(8), torch.randn(8, 32)  # ΔW = P·diag(λ)·Q
>>> S = F.factored_singular_values(P, lam, Q)  # (8,) exact singular values of ΔW
>>> score = F.spectral_entropy(S)  # eq. 3, normalised to [0, 1]
>>> F.budget_at(600, b0=4, t_warmup=500, t_final=500, total_steps=3000)  # eq. 4
4
```

The definitions live in `spectrum`, `scoring`, `schedule` and `allocation`; this module only gathers them.
"""

from __future__ import annotations

from .allocation import ReallocationPlan, plan_reallocation
from .schedule import budget_at, event_steps, is_event_step
from .scoring import importance, importance_batched, max_entropy, random_scores, spectral_entropy
from .spectrum import factored_singular_values, factored_svd, gram_singular_values, truncation_error

__all__ = [
    "ReallocationPlan",
    "budget_at",
    "event_steps",
    "factored_singular_values",
    "factored_svd",
    "gram_singular_values",
    "importance",
    "importance_batched",
    "is_event_step",
    "max_entropy",
    "plan_reallocation",
    "random_scores",
    "spectral_entropy",
    "truncation_error",
]
