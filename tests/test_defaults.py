"""The non-paper defaults: the lora_like start, λ's param group, per-direction Adam age, SVD pruning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexlora_hf import FlexLoRAConfig, get_flexlora_model
from flexlora_hf.adapter.layer import FlexLoRALayer
from flexlora_hf.adapter.model import FlexLoRAModel, expansion_generator
from flexlora_hf.functional.allocation import ReallocationPlan
from flexlora_hf.optim.slot_age import correction
from flexlora_hf.optim.surgery import lambda_parameters, param_groups, reset_slots


def _layer(basis: str = "orthonormal", d_in: int = 48, d_out: int = 40, r: int = 4, capacity: int = 6) -> FlexLoRALayer:
    base = nn.Linear(d_in, d_out)
    base.requires_grad_(False)
    return FlexLoRALayer(base, r=r, capacity=capacity, lora_alpha=8.0, init_basis=basis,
                         generator=torch.Generator().manual_seed(0))


def test_orthonormal_basis_makes_eq2_exactly_zero_at_init() -> None:
    layer = _layer()
    assert float(layer.orth_reg()) < 1e-10
    P, Q = layer.lora_P[:, :4].detach(), layer.lora_Q[:4].detach()
    torch.testing.assert_close(P.T @ P, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q @ Q.T, torch.eye(4), atol=1e-6, rtol=0)
    gaussian = _layer("gaussian")
    assert float(gaussian.orth_reg()) > 1.0  # the Gaussian basis starts far from eq. 2's minimum


def test_orthonormal_expansion_is_unit_norm_orthogonal_and_zero_impact() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.lora_lam[:4] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = torch.randn(3, 48)
    before = layer(x)
    slot = layer.expand(torch.Generator().manual_seed(5))
    # λ = 0: zero impact; equal up to float reassociation, since the matmuls now run over 5 directions, not 4
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    p, q = layer.lora_P[:, slot].detach(), layer.lora_Q[slot].detach()
    assert float(p.norm()) == pytest.approx(1.0, abs=1e-6) and float(q.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float((layer.lora_P[:, :4].detach().T @ p).abs().max()) < 1e-6
    assert float((layer.lora_Q[:4].detach() @ q).abs().max()) < 1e-6
    assert float(layer.orth_reg()) < 1e-10


def test_lora_like_basis_starts_as_peft_lora() -> None:
    """init_basis='lora_like': P = 0 (LoRA's B), λ·Q rows of norm 1/sqrt(3) (LoRA's A); only P learns at step one."""
    layer = _layer("lora_like")
    x = torch.randn(5, 48)
    assert torch.equal(layer(x), layer.base_layer(x))  # zero impact through P = 0, exactly
    Q = layer.lora_Q[:4].detach()  # (r, in)
    torch.testing.assert_close(Q @ Q.T, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_lam[:4].detach(), torch.full((4,), 3.0**-0.5))
    assert float(layer.orth_reg()) == pytest.approx(4.0)  # ||PᵀP - I||² = r at P = 0; Q's part is 0
    layer(x).pow(2).sum().backward()
    assert layer.lora_P.grad is not None and float(layer.lora_P.grad[:, :4].abs().max()) > 0
    assert float(layer.lora_lam.grad.abs().max()) == 0.0 and float(layer.lora_Q.grad.abs().max()) == 0.0


def test_lora_like_expansion_is_zero_impact_and_orthogonal_to_a_trained_P() -> None:
    layer = _layer("lora_like")
    with torch.no_grad():
        layer.lora_P[:, :4] = 0.1 * torch.randn(40, 4)  # trained P: small, not orthonormal
    x = torch.randn(3, 48)
    before = layer(x)
    slot = layer.expand(torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    p, q = layer.lora_P[:, slot].detach(), layer.lora_Q[slot].detach()
    assert float(layer.lora_lam[slot]) == 0.0
    assert float(p.norm()) == pytest.approx(1.0, abs=1e-6) and float(q.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float((layer.lora_P[:, :4].detach().T @ p).abs().max()) < 1e-6
    assert float((layer.lora_Q[:4].detach() @ q).abs().max()) < 1e-6


def test_lora_like_prunes_the_smallest_direction_not_the_smallest_lambda() -> None:
    """svd_prune=False: under lora_like λ is not yet a singular value, the pruned direction is the one of smallest
    |λ|·||p||·||q|| (the rotated default is tested in test_spectrum.py)."""
    layer = _layer("lora_like")
    with torch.no_grad():
        layer.lora_P[:, :4] = torch.linalg.qr(torch.randn(40, 4))[0] * torch.tensor([1.0, 0.9, 0.05, 0.8])  # (out, r)
        layer.lora_lam[:4] = torch.tensor([0.5, 0.3, 2.0, 0.6])  # smallest |λ| is slot 1; smallest size is slot 2
    torch.testing.assert_close(layer.direction_sizes()[:4], torch.tensor([0.5, 0.27, 0.1, 0.48]), atol=1e-5, rtol=0)
    removed, _ = layer.prune_smallest(rotate=False)
    assert removed == 2
    orthonormal = _layer("orthonormal")
    with torch.no_grad():
        orthonormal.lora_lam[:4] = torch.tensor([0.5, 0.3, 2.0, 0.6])
    assert orthonormal.prune_smallest(rotate=False)[0] == 1  # the paper's rule: smallest |λ|


def test_default_config_is_the_lora_like_start_at_the_papers_single_rate() -> None:
    cfg = FlexLoRAConfig()
    assert cfg.init_basis == "lora_like"
    with pytest.raises(TypeError, match="lam_lr_ratio"):
        FlexLoRAConfig(lam_lr_ratio=2.0)  # removed: λ trains at the optimizer's rate


def test_correction_factor_matches_fresh_adam_bias_correction() -> None:
    b1, b2 = 0.9, 0.999
    # a tensor far along (t large) has no bias correction left; a 1-step-old slot needs (sqrt(1-b2)/(1-b1))
    assert correction(1, 10_000, b1, b2) == pytest.approx(math.sqrt(1 - b2) / (1 - b1), rel=1e-4)
    assert correction(7, 7, b1, b2) == pytest.approx(1.0)  # a slot as old as its tensor: nothing to correct
    assert abs(correction(8000, 20_000, b1, b2) - 1.0) < 1e-3


def _expand(fm: FlexLoRAModel, opt: torch.optim.Optimizer, step: int, corrected: bool) -> int:
    """Add one direction after `step`: as an event does (corrected by its own age), or as the reference code does
    (moments zeroed, the tensor's shared step counter kept). Both draw the same direction."""
    name = fm.module_names[0]
    if corrected:
        return fm.apply_plan(ReallocationPlan(expand=(name,), budget=1), opt, step=step)[name][0]
    layer = next(layer for _, layer in fm.flexlora_layers())
    slot = layer.expand(expansion_generator(fm.flexlora_config.seed, step), init="zero_impact")
    reset_slots(opt, [(layer, [slot])])
    return slot


@pytest.mark.parametrize("scheme", ["slot_age", "shared_step"])
def test_new_direction_takes_at_most_one_lr_per_step(scheme: str) -> None:
    """Constant gradient on λ: a fresh Adam moves by lr per step; the shared counter (the reference code) gives
    ~3.2x lr at first."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    fm = get_flexlora_model(base, FlexLoRAConfig(r=2, b0=0, max_rank=3, target_modules=["0"]))
    layer = next(layer for _, layer in fm.flexlora_layers())
    layer.lora_P.requires_grad_(False)  # P and Q fixed: d loss / d λ is exactly constant, as the bound assumes
    layer.lora_Q.requires_grad_(False)
    lr = 1e-3
    opt = torch.optim.AdamW([layer.lora_lam], lr=lr, weight_decay=0.0)
    x = torch.randn(8, 16)

    def step() -> None:
        opt.zero_grad()
        (fm(x) * torch.ones(16)).sum().backward()  # linear in λ: a constant gradient
        opt.step()

    for _ in range(200):
        step()
    slot = _expand(fm, opt, 200, corrected=scheme == "slot_age")
    moves = []
    for _ in range(12):
        before = float(layer.lora_lam[slot])
        step()
        moves.append(abs(float(layer.lora_lam[slot]) - before) / lr)
    if scheme == "slot_age":
        assert max(moves) <= 1.0 + 1e-3, moves  # documented bound: a fresh Adam's step, never more than lr
        assert moves[0] == pytest.approx(1.0, rel=1e-2)
    else:
        # the shared counter (t = 201) under-corrects: 1 / c(1, 201) = 1.35 x lr here, 3.16 x lr for t >> 1000
        assert moves[0] == pytest.approx(1 / correction(1, 201, 0.9, 0.999), rel=1e-3)
        assert max(moves) > 1.3


def test_slot_age_leaves_every_other_slice_alone() -> None:
    torch.manual_seed(0)
    fm_a = get_flexlora_model(nn.Sequential(nn.Linear(16, 16)), FlexLoRAConfig(r=2, b0=0, max_rank=3, target_modules=["0"]))
    torch.manual_seed(0)
    fm_b = get_flexlora_model(nn.Sequential(nn.Linear(16, 16)), FlexLoRAConfig(r=2, b0=0, max_rank=3, target_modules=["0"]))
    x = torch.randn(8, 16)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (fm_a, fm_b)]
    for t in range(1, 12):  # identical runs up to the event after step 10, then one step
        for m, o in zip((fm_a, fm_b), opts, strict=True):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
            if t == 10:
                _expand(m, o, t, corrected=m is fm_a)
    la, lb = (next(layer for _, layer in m.flexlora_layers()) for m in (fm_a, fm_b))
    for name in ("lora_P", "lora_lam", "lora_Q"):
        a, b = getattr(la, name).detach(), getattr(lb, name).detach()
        assert torch.equal(a.narrow(-1 if name == "lora_P" else 0, 0, 2), b.narrow(-1 if name == "lora_P" else 0, 0, 2))
    assert not torch.equal(la.lora_lam[2:], lb.lora_lam[2:])  # the new direction: corrected
    assert la.slot_birth == {2: 10} and lb.slot_birth == {}  # only the corrected run tracks the young direction


def test_param_groups_put_lambda_alone_without_decay() -> None:
    fm = get_flexlora_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), FlexLoRAConfig(r=2, b0=0))
    groups = param_groups(fm, lr=1e-3, weight_decay=0.1)
    lam = [g for g in groups if any(p is lambda_parameters(fm)[0] for p in g["params"])]
    assert len(lam) == 1 and lam[0]["lr"] == pytest.approx(1e-3) and lam[0]["weight_decay"] == 0.0
    assert {id(p) for p in lam[0]["params"]} == {id(p) for p in lambda_parameters(fm)}
    directions = [p for n, p in fm.named_parameters() if n.endswith(("lora_P", "lora_Q"))]
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert directions and all(group_of[id(p)]["weight_decay"] == 0.1 for p in directions)  # P, Q decay as weights
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in fm.parameters() if p.requires_grad)


def test_config_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="init_basis"):
        FlexLoRAConfig(init_basis="xavier")

