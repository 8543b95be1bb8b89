"""The active-prefix computation equals the first version's masked full-capacity one (tests/reference_impl.py):
outputs, gradients and rank decisions, through events and a resume."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    cls_dataset,
    lm_dataset,
    random_lambda,
    tiny_bert,
    tiny_llama,
    trainer_bert,
    trainer_llama,
    training_args,
)
from reference_impl import masked_forward, masked_orth_reg

from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer, get_flexlora_model
from flexlora_hf.adapter.layer import FlexLoRALayer
from flexlora_hf.functional import plan_reallocation

BUILDERS = {"llama": tiny_llama, "bert": tiny_bert}


def _outputs_and_grads(fm, x):
    for p in fm.parameters():
        p.grad = None
    out = fm(input_ids=x).logits
    ((out**2).mean() + 0.1 * fm.orth_reg()).backward()
    grads = {n: p.grad.clone() for n, p in fm.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_outputs_and_gradients_equal_the_masked_computation(arch: str, monkeypatch) -> None:
    fm = get_flexlora_model(BUILDERS[arch](), FlexLoRAConfig(r=4, b0=0, max_rank=7, lora_alpha=8.0))
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for event in range(3):  # ranks move: prunes pack the prefix, expansions extend it
        random_lambda(fm, seed=event)
        with torch.no_grad():  # the default lora_like start has P = 0, hence ΔW = 0 and no spectrum to move rank by
            for _, layer in fm.flexlora_layers():
                layer.lora_P[:, : layer.rank] += torch.randn(layer.out_features, layer.rank) * 0.1
        plan = plan_reallocation(fm.importance_scores(), fm.rank_map(), 3, min_rank=1, max_rank=fm.rank_caps())
        fm.apply_plan(plan, step=10 + event)
    assert len(set(fm.rank_map().values())) > 1
    random_lambda(fm, seed=9)
    prefix_out, prefix_grads = _outputs_and_grads(fm, x)
    monkeypatch.setattr(FlexLoRALayer, "forward", masked_forward)
    monkeypatch.setattr(FlexLoRALayer, "orth_reg", masked_orth_reg)
    masked_out, masked_grads = _outputs_and_grads(fm, x)
    torch.testing.assert_close(prefix_out, masked_out, rtol=1e-5, atol=1e-5)
    assert prefix_grads.keys() == masked_grads.keys()
    for name in prefix_grads:
        torch.testing.assert_close(prefix_grads[name], masked_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        if "lora_" in name:  # inactive slots: exactly zero gradient in both
            layer = fm.get_submodule(name.rsplit(".", 1)[0])
            r = layer.rank
            dead = prefix_grads[name][..., r:] if name.endswith("lora_P") else prefix_grads[name][r:]
            assert torch.count_nonzero(dead) == 0


def _train(model, tmp_path, ds, **overrides):
    cfg = FlexLoRAConfig(r=4, lora_alpha=8, b0=2, t_warmup=4, t_final=4, delta_t=2, schedule="constant")
    args = training_args(str(tmp_path), max_steps=16, save_strategy="steps", save_steps=8, **overrides)
    trainer = FlexLoRATrainer(model=model, args=args, train_dataset=ds, flexlora_config=cfg)
    return trainer


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_rank_decisions_equal_the_masked_computation_through_resume(kind: str, tmp_path, monkeypatch) -> None:
    # float64: in float32 the two computations differ in the last bits, which Adam's normalisation of the tiny first
    # gradients of new directions amplifies to ~1e-4 in λ (see test_gradient_accumulation_gives_same_rank_decisions)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _compare_runs(kind, tmp_path, monkeypatch)
    finally:
        torch.set_default_dtype(default)


def _compare_runs(kind: str, tmp_path, monkeypatch) -> None:
    make, ds = (trainer_llama, lm_dataset()) if kind == "llama" else (trainer_bert, cls_dataset())
    prefix = _train(make(), tmp_path / "prefix", ds)
    prefix.train()
    resumed = _train(make(), tmp_path / "prefix", ds)  # resume from checkpoint-8 with the new code
    resumed.train(resume_from_checkpoint=str(tmp_path / "prefix" / "checkpoint-8"))
    monkeypatch.setattr(FlexLoRALayer, "forward", masked_forward)
    monkeypatch.setattr(FlexLoRALayer, "orth_reg", masked_orth_reg)
    masked = _train(make(), tmp_path / "masked", ds)
    masked.train()

    def decisions(t):
        return [(e["step"], e["prune"], e["expand"]) for e in t.flexlora_model.rank_history]

    assert len(decisions(prefix)) == 4  # after steps 6, 8, 10, 12; the resume starts at 8
    assert decisions(prefix) == decisions(masked) == decisions(resumed)
    for run in (masked, resumed):
        for (name, a), (_, b) in zip(prefix.flexlora_model.flexlora_layers(), run.flexlora_model.flexlora_layers(), strict=True):
            assert a.lora_lam.dtype == torch.float64
            torch.testing.assert_close(a.lora_lam, b.lora_lam, rtol=1e-7, atol=1e-9, msg=name)
