"""`FlexLoRALayer` / `FlexLoRAModel` / optimizer surgery on tiny random Llama, BERT and GPT-2 models (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_lambda, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.optimization import Adafactor

from flexlora_hf.adapter.layer import FlexLoRALayer
from flexlora_hf.adapter.model import FlexLoRAModel, expansion_generator, get_flexlora_model
from flexlora_hf.config import FlexLoRAConfig
from flexlora_hf.functional.allocation import ReallocationPlan, plan_reallocation
from flexlora_hf.functional.schedule import event_steps
from flexlora_hf.functional.scoring import importance
from flexlora_hf.optim.surgery import UnsupportedOptimizerError, check_optimizer_supported, reset_slots

# ------------------------------------------------------------------------------------------------ tiny models
BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
ARCHS = list(BUILDERS)


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def wrap(arch: str, **overrides) -> tuple[FlexLoRAModel, nn.Module]:
    """(FlexLoRA model, untouched deep copy of the same base model)."""
    base = BUILDERS[arch]()
    ref = copy.deepcopy(base)
    kwargs = dict(r=4, b0=1, max_rank=8, lora_alpha=8.0, init_basis="orthonormal")  # λ is the size the tests set
    kwargs.update(overrides)
    return get_flexlora_model(base, FlexLoRAConfig(**kwargs)), ref


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


def _is_adapter_param(name: str) -> bool:
    return any(k in name for k in ("lora_P", "lora_lam", "lora_Q"))


# ------------------------------------------------------------------------------------------------ output invariance
@pytest.mark.parametrize("arch", ARCHS)
def test_output_equals_base_at_init(arch: str) -> None:
    model, ref = wrap(arch)
    assert torch.equal(logits(model), logits(ref))
    assert all(layer.rank == 4 for _, layer in model.flexlora_layers())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["zero_impact", "orthogonal", "zero"])
def test_expand_keeps_output(arch: str, init: str) -> None:
    model, _ = wrap(arch, expansion_init=init)
    random_lambda(model, scale=20.0)
    before = logits(model)
    names = model.module_names[::2]
    touched = model.apply_plan(ReallocationPlan(expand=tuple(names), budget=len(names)), step=7)
    assert sorted(touched) == sorted(names)
    for name, layer in model.flexlora_layers():
        assert layer.rank == (5 if name in names else 4)
    assert_same(logits(model), before)


def test_small_init_changes_output() -> None:
    """Control for the test above: a non-zero λ on the new direction does change the output."""
    model, _ = wrap("llama", expansion_init="small")
    random_lambda(model, scale=20.0)
    before = logits(model)
    model.apply_plan(ReallocationPlan(expand=tuple(model.module_names), budget=1), step=1)
    assert not torch.allclose(logits(model), before, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_zero_lambda_keeps_output(arch: str) -> None:
    model, ref = wrap(arch)
    random_lambda(model, scale=20.0)
    with torch.no_grad():
        for _, layer in model.flexlora_layers():
            layer.lora_lam[2] = 0.0
    before = logits(model)
    assert not torch.allclose(before, logits(ref), atol=1e-4)  # λ really changed the model
    rotated = copy.deepcopy(model)
    for _, layer in model.flexlora_layers():
        assert layer.prune_smallest(rotate=False) == (2, 3)  # slot 2 removed, the last one (slot 3) moved in
        assert layer.rank == 3
    # equal up to float reassociation (the matmuls now run over 3 directions, not 4); the λ of 20 makes logits large
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    for _, layer in rotated.flexlora_layers():
        assert layer.prune_smallest() == (3, None)  # rotated onto ΔW's SVD first: its zero direction is the last
    torch.testing.assert_close(logits(rotated), before, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ layer surgery
def _layer(d_in: int = 24, d_out: int = 20, r: int = 4, capacity: int = 6, **kw) -> FlexLoRALayer:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    base.requires_grad_(False)
    return FlexLoRALayer(base, r=r, capacity=capacity, lora_alpha=8.0, generator=torch.Generator().manual_seed(3), **kw)


def test_prune_smallest_uses_magnitude() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.lora_lam[:4] = torch.tensor([0.5, -10.0, 0.2, 3.0])
    # a signed argmin would pick slot 1 (λ = -10), the largest direction
    assert layer.prune_smallest(rotate=False) == (2, 3)  # 0.2 goes; 3.0 moves from the last slot into the hole
    assert layer.active_slots().tolist() == [0, 1, 2]
    assert layer.lora_lam.detach()[:3].tolist() == [0.5, -10.0, 3.0]
    assert layer.prune_smallest(rotate=False) == (0, 2)  # 0.5 goes; 3.0 moves again
    assert layer.prune_smallest(rotate=False) == (0, 1)  # 3.0 goes; -10 moves into slot 0
    assert layer.active_slots().tolist() == [0]
    assert float(layer.lora_lam.detach()[0]) == -10.0


def test_prune_ties_take_lowest_slot_and_empty_raises() -> None:
    layer = _layer(r=2, capacity=2)
    with torch.no_grad():
        layer.lora_lam.copy_(torch.tensor([-1.0, 1.0]))
    assert layer.prune_smallest(rotate=False) == (0, 1)  # tie: the lowest slot goes, slot 1 moves in
    assert float(layer.lora_lam.detach()[0]) == 1.0
    assert layer.prune_smallest(rotate=False) == (0, None)  # the last active direction: nothing to move
    with pytest.raises(RuntimeError, match="no active direction"):
        layer.prune_smallest(rotate=False)


def test_pruned_slot_is_exactly_zero() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.lora_lam[:4] = torch.tensor([0.3, 0.1, 0.7, -0.9])
    P_last, Q_last = layer.lora_P.detach()[:, 3].clone(), layer.lora_Q.detach()[3].clone()
    slot, moved_from = layer.prune_smallest(rotate=False)
    assert (slot, moved_from) == (1, 3)
    assert float(layer.lora_lam.detach()[1]) == pytest.approx(-0.9)  # the moved direction, intact
    assert torch.equal(layer.lora_P.detach()[:, 1], P_last) and torch.equal(layer.lora_Q.detach()[1], Q_last)
    freed = 3  # the slot the move vacated: inactive and exactly zero
    assert not bool(layer.lora_active[freed])
    assert torch.count_nonzero(layer.lora_P[:, freed]) == 0
    assert float(layer.lora_lam.detach()[freed]) == 0.0
    assert torch.count_nonzero(layer.lora_Q[freed]) == 0
    assert float(layer.lam_eff().detach()[freed]) == 0.0


def test_expand_fills_first_free_slot_and_respects_capacity() -> None:
    layer = _layer(r=4, capacity=6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_lam[:4] = torch.tensor([0.3, 0.1, 0.7, -0.9])
    assert layer.prune_smallest(rotate=False) == (1, 3)
    assert layer.expand(g) == 3  # the first free slot after the active prefix
    assert layer.expand(g) == 4
    assert layer.expand(g) == 5
    assert layer.rank == 6
    with pytest.raises(RuntimeError, match="capacity"):
        layer.expand(g)
    with pytest.raises(ValueError, match="bogus"):
        _layer().expand(g, init="bogus")


@pytest.mark.parametrize("arch", ARCHS)
def test_inactive_slots_get_zero_gradient(arch: str) -> None:
    model, _ = wrap(arch)
    random_lambda(model, scale=5.0)
    with torch.no_grad():
        for _, layer in model.flexlora_layers():
            layer.prune_smallest()
            # garbage in a free slot must still be masked out of the forward and the gradient
            layer.lora_P[:, -1] = 1.0
            layer.lora_Q[-1] = 1.0
            layer.lora_lam[-1] = 1.0
    out = model(input_ids=ids()).logits
    loss = (out**2).mean() + model.orth_reg()
    loss.backward()
    for _, layer in model.flexlora_layers():
        inactive = (~layer.lora_active).nonzero().flatten()
        active = layer.active_slots()
        assert inactive.numel() == 5  # capacity 8, rank 3
        assert torch.count_nonzero(layer.lora_P.grad[:, inactive]) == 0
        assert torch.count_nonzero(layer.lora_lam.grad[inactive]) == 0
        assert torch.count_nonzero(layer.lora_Q.grad[inactive]) == 0
        for slot in active.tolist():
            assert layer.lora_P.grad[:, slot].abs().sum() > 0
            assert layer.lora_lam.grad[slot].abs() > 0
            assert layer.lora_Q.grad[slot].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ merge
def _hand_merged(model: FlexLoRAModel, ref: nn.Module) -> nn.Module:
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for name, layer in model.flexlora_layers():
            c = layer.compact()
            P, lam, Q = c["P"], c["lam"], c["Q"]  # (out, r), (r,), (r, in)
            assert P.shape == (layer.out_features, layer.rank) and Q.shape == (layer.rank, layer.in_features)
            delta = layer.scaling * P @ torch.diag(lam) @ Q  # (out, in)
            target = ref.get_submodule(name)
            if type(target).__name__ == "Conv1D":
                target.weight += delta.T  # Conv1D stores (in, out)
            else:
                target.weight += delta
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_equivalence(arch: str) -> None:
    model, ref = wrap(arch)
    random_lambda(model, scale=30.0)
    # make the active slots non-contiguous, with a fresh direction that has been given a λ
    model.apply_plan(ReallocationPlan(prune=tuple(model.module_names[:3]), budget=3), step=1)
    model.apply_plan(ReallocationPlan(expand=tuple(model.module_names[1:5]), budget=4), step=2)
    with torch.no_grad():
        for _, layer in model.flexlora_layers():
            layer.lora_lam.add_(0.5 * layer.lora_active)
    out = logits(model)
    assert not torch.allclose(out, logits(ref), atol=1e-3)  # the adapter matters
    merged_by_hand = _hand_merged(model, ref)
    torch.testing.assert_close(out, logits(merged_by_hand), rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, FlexLoRALayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), out, rtol=1e-5, atol=1e-5)


def test_delta_weight_matches_compact() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.lora_lam[:4] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    layer.prune_smallest()
    c = layer.compact()
    assert c["slots"].tolist() == [0, 1, 2]  # the active slots are always a prefix
    expected = layer.scaling * (c["P"] * c["lam"]) @ c["Q"]
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ orthogonality
def test_orth_reg_equals_eq2_on_compact() -> None:
    layer = _layer(d_in=24, d_out=20, r=5, capacity=8)
    with torch.no_grad():
        layer.lora_P.mul_(20.0)
        layer.lora_lam[:5] = torch.tensor([1.0, 0.1, 2.0, -3.0, 0.5])
    layer.prune_smallest(rotate=False)  # slot 1 inactive: the compacted matrices skip it
    c = layer.compact()
    P, Q = c["P"].double(), c["Q"].double()  # (out, r), (r, in)
    r = P.shape[1]
    eye = torch.eye(r, dtype=torch.float64)
    expected = ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()
    assert float(layer.orth_reg().detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 1.0


def test_orth_reg_zero_for_orthonormal() -> None:
    layer = _layer(d_in=24, d_out=20, r=4, capacity=6)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        Pq, _ = torch.linalg.qr(torch.randn(20, 4, generator=g))
        Qq, _ = torch.linalg.qr(torch.randn(24, 4, generator=g))
        layer.lora_P[:, :4] = Pq
        layer.lora_Q[:4] = Qq.T
    assert float(layer.orth_reg().detach()) < 1e-10
    with torch.no_grad():
        layer.lora_P[:, 0] *= 2.0  # column norm 2: (4 - 1)² = 9
    assert float(layer.orth_reg().detach()) == pytest.approx(9.0, rel=1e-5)


def test_model_orth_reg_is_mean_over_layers() -> None:
    model, _ = wrap("llama")
    terms = torch.stack([layer.orth_reg() for _, layer in model.flexlora_layers()])
    torch.testing.assert_close(model.orth_reg(), terms.mean())
    assert model.orth_reg().requires_grad


# ------------------------------------------------------------------------------------------------ expansion inits
def _active_P_Q(layer: FlexLoRALayer, exclude: int) -> tuple[torch.Tensor, torch.Tensor]:
    slots = [s for s in layer.active_slots().tolist() if s != exclude]
    return layer.lora_P.detach()[:, slots], layer.lora_Q.detach()[slots]


@pytest.mark.parametrize("init", ["small", "orthogonal"])
def test_orthogonalised_inits(init: str) -> None:
    layer = _layer(d_in=40, d_out=32, r=4, capacity=6)
    slot = layer.expand(torch.Generator().manual_seed(11), init=init, small_value=1e-3)
    P_old, Q_old = _active_P_Q(layer, slot)
    p, q = layer.lora_P.detach()[:, slot], layer.lora_Q.detach()[slot]
    # orthogonal to every active direction (relative to the norms involved)
    assert (P_old.T @ p).abs().max() < 1e-6 * p.norm() * P_old.norm(dim=0).max()
    assert (Q_old @ q).abs().max() < 1e-6 * q.norm() * Q_old.norm(dim=1).max()
    assert p.norm() > 0 and q.norm() > 0
    expected_lam = 1e-3 if init == "small" else 0.0
    assert float(layer.lora_lam.detach()[slot]) == pytest.approx(expected_lam)
    # a plain zero_impact draw (Gaussian basis) from the same generator is *not* orthogonal: the test above can fail
    raw = _layer(d_in=40, d_out=32, r=4, capacity=6, init_basis="gaussian")  # orthonormal bases orthogonalise always
    s2 = raw.expand(torch.Generator().manual_seed(11), init="zero_impact")
    assert (P_old.T @ raw.lora_P.detach()[:, s2]).abs().max() > 1e-6


def test_zero_init_is_all_zero() -> None:
    layer = _layer()
    slot = layer.expand(torch.Generator().manual_seed(0), init="zero")
    assert bool(layer.lora_active[slot])
    assert torch.count_nonzero(layer.lora_P[:, slot]) == 0
    assert torch.count_nonzero(layer.lora_Q[slot]) == 0
    assert float(layer.lora_lam.detach()[slot]) == 0.0


def test_zero_impact_draws_at_init_scale() -> None:
    base = nn.Linear(2048, 2048, bias=False)
    layer = FlexLoRALayer(base, r=1, capacity=2, lora_alpha=2.0, init_scale=0.02, init_basis="gaussian")
    slot = layer.expand(torch.Generator().manual_seed(0), init="zero_impact")
    assert slot == 1
    assert float(layer.lora_lam.detach()[slot]) == 0.0
    assert float(layer.lora_P.detach()[:, slot].std()) == pytest.approx(0.02, rel=0.1)
    assert float(layer.lora_Q.detach()[slot].std()) == pytest.approx(0.02, rel=0.1)
    assert abs(float(layer.lora_P.detach()[:, slot].mean())) < 0.003
    # the initial directions use the same scale
    assert float(layer.lora_P.detach()[:, 0].std()) == pytest.approx(0.02, rel=0.1)


def test_expansion_generator_is_deterministic() -> None:
    a = torch.randn(5, generator=expansion_generator(3, 100))
    b = torch.randn(5, generator=expansion_generator(3, 100))
    c = torch.randn(5, generator=expansion_generator(3, 200))
    d = torch.randn(5, generator=expansion_generator(4, 100))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_apply_plan_draws_depend_only_on_seed_and_step() -> None:
    m1, _ = wrap("llama", seed=3)
    m2, _ = wrap("llama", seed=3)
    random_lambda(m2, seed=9)  # history differs; draws must not
    plan = ReallocationPlan(expand=tuple(m1.module_names[:4]), budget=4)
    t1 = m1.apply_plan(plan, step=40)
    t2 = m2.apply_plan(plan, step=40)
    assert t1 == t2
    for (_, l1), (_, l2) in zip(m1.flexlora_layers(), m2.flexlora_layers(), strict=True):
        assert torch.equal(l1.lora_P, l2.lora_P) and torch.equal(l1.lora_Q, l2.lora_Q)
    m3, _ = wrap("llama", seed=3)
    m3.apply_plan(plan, step=41)
    name = m1.module_names[0]
    slot = t1[name][0]
    l1, l3 = m1.get_submodule("base_model." + name), m3.get_submodule("base_model." + name)
    assert not torch.equal(l1.lora_P[:, slot], l3.lora_P[:, slot])


# ------------------------------------------------------------------------------------------------ injection
def test_unknown_target_lists_linear_names() -> None:
    with pytest.raises(ValueError, match="nonexistent") as info:
        wrap("llama", target_modules=["q_proj", "nonexistent"])
    message = str(info.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_target_selection_by_names_regex_and_all_linear() -> None:
    by_name, _ = wrap("llama", target_modules=["q_proj", "v_proj"])
    assert by_name.module_names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]
    by_regex, _ = wrap("llama", target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert by_regex.module_names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        wrap("llama", target_modules=r"q_proj")  # a regex must match the full path
    all_linear, _ = wrap("llama", target_modules="all-linear")
    assert len(all_linear.module_names) == 14
    assert "lm_head" not in all_linear.module_names
    assert isinstance(all_linear.base_model.lm_head, nn.Linear)
    gpt2, _ = wrap("gpt2", target_modules="all-linear")
    assert len(gpt2.module_names) == 8 and "lm_head" not in gpt2.module_names
    assert type(gpt2.base_model.transformer.h[0].attn.c_attn).__name__ == "FlexLoRALayer"


@pytest.mark.parametrize("arch", ARCHS)
def test_base_frozen_and_heads(arch: str) -> None:
    model, _ = wrap(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert _is_adapter_param(name) or (arch == "bert" and ".classifier." in f".{name}")
    for name, layer in model.flexlora_layers():
        assert all(not p.requires_grad for p in layer.base_layer.parameters()), name
    if arch == "bert":
        assert model.flexlora_config.modules_to_save == ["classifier"]
        assert model.base_model.classifier.weight.requires_grad
        assert model.base_model.classifier.bias.requires_grad
        assert not any("classifier" in n for n in model.module_names)
        assert logits(model).shape == (2, 3)


def test_views_share_keys() -> None:
    model, _ = wrap("bert")
    ranks = model.rank_map()
    assert list(ranks) == model.module_names
    assert set(model.importance_scores()) == set(ranks) == set(model.rank_caps())
    assert model.total_rank() == 4 * len(ranks)
    # at init λ = 0: every module's entropy is 0 by the degenerate-case rule, never NaN
    assert set(model.importance_scores().values()) == {0.0}
    random_lambda(model)
    layer = next(layer for _, layer in model.flexlora_layers())
    layer.prune_smallest()
    assert model.total_rank() == 4 * len(ranks) - 1
    assert all(0.0 < s <= 1.0 for s in model.importance_scores().values())
    assert set(model.importance_scores("nuclear")) == set(ranks)


def test_default_capacity_is_r_plus_events() -> None:
    sched = dict(b0=1, t_warmup=10, t_final=10, delta_t=10, total_steps=100, schedule="constant")
    n_events = len(event_steps(**sched))
    assert n_events == 8
    model, _ = wrap("llama", r=4, max_rank=None, **sched)
    for _, layer in model.flexlora_layers():
        assert layer.capacity == min(4 + n_events, layer.in_features, layer.out_features)
    caps = model.rank_caps()
    assert caps["model.layers.0.self_attn.q_proj"] == 12
    # bounded by min(d_in, d_out): k_proj is (16 x 32)
    long = dict(sched, delta_t=1)
    model, _ = wrap("llama", r=4, max_rank=None, **long)
    assert len(event_steps(**long)) == 80
    caps = model.rank_caps()
    assert caps["model.layers.0.self_attn.k_proj"] == 16
    assert caps["model.layers.0.mlp.gate_proj"] == 32
    # prune_only never grows a module: capacity stays r
    model_p, _ = wrap("llama", r=4, max_rank=None, **dict(sched, allocation="prune_only"))
    assert set(model_p.rank_caps().values()) == {4}
    # mixed capacities are padded for the batched score: each equals the single-matrix score of its active λ
    random_lambda(model, seed=4)
    scores = model.importance_scores()
    for name, layer in model.flexlora_layers():
        expected = importance(layer.lora_lam.detach()[layer.active_slots()], metric="entropy")
        assert scores[name] == pytest.approx(expected, rel=1e-6)


def test_finalize_capacity_grows_provisional_capacity() -> None:
    model, ref = wrap("llama", r=4, max_rank=None, b0=1, t_warmup=10, t_final=10, delta_t=10, schedule="constant")
    assert set(model.rank_caps().values()) == {4}  # no total_steps yet: provisional
    assert model.finalize_capacity(100) is True
    assert model.flexlora_config.total_steps == 100
    assert set(model.rank_caps().values()) == {12}
    for _, layer in model.flexlora_layers():
        assert (
            layer.lora_P.shape[1]
            == layer.lora_lam.shape[0]
            == layer.lora_Q.shape[0]
            == layer.lora_active.shape[0]
            == 12
        )
        assert layer.rank == 4
        assert isinstance(layer.lora_P, nn.Parameter) and layer.lora_P.requires_grad
        assert int(dict(layer.named_buffers())["lora_rank"]) == 4  # the rank survives a state_dict round trip
    assert torch.equal(logits(model), logits(ref))
    assert model.finalize_capacity(100) is False  # already final


# ------------------------------------------------------------------------------------------------ optimizer surgery
def _train_steps(model: FlexLoRAModel, opt: torch.optim.Optimizer, n: int = 2) -> None:
    x = ids()
    for _ in range(n):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss + 0.1 * model.orth_reg()
        loss.backward()
        opt.step()


def _snapshot(opt: torch.optim.Optimizer) -> dict:
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}


SLOT_DIM = {"lora_P": 1, "lora_lam": 0, "lora_Q": 0}


@pytest.mark.parametrize("variant", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_apply_plan_resets_only_touched_moments(variant: dict) -> None:
    # the in-place prune (svd_prune=False): moments follow the moved direction; the rotated prune: test_spectrum.py
    model, _ = wrap("llama", r=4, max_rank=6, svd_prune=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, **variant)
    check_optimizer_supported(opt)
    _train_steps(model, opt)
    scores = model.importance_scores()
    plan = plan_reallocation(scores, model.rank_map(), 3, min_rank=1, max_rank=model.rank_caps())
    assert len(plan.prune) == 3 and len(plan.expand) == 3
    before = _snapshot(opt)
    layers = dict(model.flexlora_layers())
    pruned_slots = {}
    for name in plan.prune:  # the slot prune_smallest will pick (the last active direction, 3, moves into it)
        layer = layers[name]
        pruned_slots[name] = int(layer.lora_lam.detach()[:4].abs().argmin())

    touched = model.apply_plan(plan, opt, step=2)

    assert set(touched) == set(plan.prune) | set(plan.expand)
    for name in plan.prune:
        j = pruned_slots[name]
        assert touched[name] == ([j, 3] if j != 3 else [3])
    for name in plan.expand:
        assert touched[name] == [4]
    assert len(before) == len(params)
    layer_of = {getattr(layers[n], a): (n, d) for n in touched for a, d in SLOT_DIM.items()}
    for p in params:
        state, old = opt.state[p], before[p]
        assert set(state) == set(old)
        assert torch.equal(state["step"], old["step"])  # per-tensor step counter untouched
        if p not in layer_of:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key], old[key])
            continue
        name, dim = layer_of[p]
        for key in ("exp_avg", "exp_avg_sq"):
            new_, old_ = state[key], old[key]
            if name in plan.prune:
                j = pruned_slots[name]
                if j != 3:  # the moved direction keeps its moments exactly
                    assert torch.equal(new_.select(dim, j), old_.select(dim, 3))
                    assert torch.count_nonzero(old_.select(dim, j)) > 0  # and the pruned ones were trained
                assert torch.count_nonzero(new_.select(dim, 3)) == 0  # the freed slot starts clean
                keep = [i for i in range(p.shape[dim]) if i not in (j, 3)]
            else:
                assert torch.count_nonzero(new_.select(dim, 4)) == 0  # the new direction starts clean
                keep = [i for i in range(p.shape[dim]) if i != 4]
            idx = torch.tensor(keep)
            assert torch.equal(new_.index_select(dim, idx), old_.index_select(dim, idx))  # everything else: bit-identical

    # training continues; the freed slots stay exactly zero under AdamW's decoupled decay
    _train_steps(model, opt, n=1)
    for name in plan.prune:
        layer = layers[name]
        assert layer.rank == 3 and not bool(layer.lora_active[3])
        assert torch.count_nonzero(layer.lora_P[:, 3]) == 0
        assert float(layer.lora_lam.detach()[3]) == 0.0
        assert torch.count_nonzero(layer.lora_Q[3]) == 0
    for name in plan.expand:
        assert float(layers[name].lora_lam.detach()[4]) != 0.0  # the new direction trains


class _Wrapper:
    """Stand-in for accelerate's AcceleratedOptimizer: exposes the torch optimizer as `.optimizer`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_apply_plan_through_wrapper_and_before_first_step() -> None:
    model, _ = wrap("llama", r=4, max_rank=6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    name = model.module_names[0]
    # no step yet: no state to reset, nothing raises
    model.apply_plan(ReallocationPlan(expand=(name,), budget=1), _Wrapper(opt), step=1)
    _train_steps(model, opt, n=1)
    layer = dict(model.flexlora_layers())[name]
    assert torch.count_nonzero(opt.state[layer.lora_lam]["exp_avg"][:5]) > 0
    model.apply_plan(ReallocationPlan(prune=(name,), budget=1), _Wrapper(opt), step=2)
    freed = layer.rank  # 5 -> 4 directions: slot 4 is free again, its moments zero
    assert freed == 4
    assert float(opt.state[layer.lora_lam]["exp_avg"][freed]) == 0.0
    assert torch.count_nonzero(opt.state[layer.lora_P]["exp_avg_sq"][:, freed]) == 0


class AdamW8bit(torch.optim.Optimizer):
    """External stand-in named like bitsandbytes' 8-bit AdamW."""

    def __init__(self, params) -> None:
        super().__init__(params, dict(lr=1e-3))

    def step(self, closure=None):  # pragma: no cover - never stepped
        return None


def test_check_optimizer_supported() -> None:
    params = [nn.Parameter(torch.zeros(3, 3))]
    check_optimizer_supported(torch.optim.AdamW(params))
    check_optimizer_supported(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    with pytest.raises(UnsupportedOptimizerError, match="AdamW8bit"):
        check_optimizer_supported(AdamW8bit(params))
    with pytest.raises(UnsupportedOptimizerError, match="8-bit"):
        check_optimizer_supported(_Wrapper(AdamW8bit(params)))
    ada = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    with pytest.raises(UnsupportedOptimizerError, match="Adafactor"):
        check_optimizer_supported(ada)
    assert issubclass(UnsupportedOptimizerError, ValueError)


def test_reset_slots_rejects_state_not_shaped_like_param() -> None:
    layer = _layer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 24)
    with torch.no_grad():
        layer.lora_lam[:4] = 1.0
    layer(x).sum().backward()
    opt.step()
    opt.state[layer.lora_P]["exp_avg_sq"] = torch.zeros(layer.lora_P.shape[0])  # factored, Adafactor-like
    with pytest.raises(UnsupportedOptimizerError, match="exp_avg_sq"):
        reset_slots(opt, [(layer, [0])])
