"""torch.compile(dynamic=True) through a rank change: the compiled model follows the eager one (slow: ~1 min CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from flexlora_hf import FlexLoRAConfig, get_flexlora_model
from flexlora_hf.functional import ReallocationPlan


@pytest.mark.slow
def test_compiled_model_matches_eager_across_an_event() -> None:
    fm = get_flexlora_model(tiny_llama(), FlexLoRAConfig(r=4, b0=0, max_rank=6))
    with torch.no_grad():
        for _, layer in fm.flexlora_layers():
            layer.lora_lam[:4] = torch.randn(4, generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(fm, dynamic=True)  # the active prefix changes length at events: symbolic shapes
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).logits, fm(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        fm.apply_plan(ReallocationPlan(expand=tuple(fm.module_names), budget=1), step=1)
        with torch.no_grad():
            for _, layer in fm.flexlora_layers():
                layer.lora_lam[4] = 0.5  # the new direction matters, so a stale compiled graph would show
        assert all(layer.rank == 5 for _, layer in fm.flexlora_layers())
        torch.testing.assert_close(compiled(input_ids=x).logits, fm(input_ids=x).logits, rtol=1e-5, atol=1e-5)
