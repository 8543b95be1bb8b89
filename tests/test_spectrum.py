"""ΔW's real spectrum: exact singular values of P·diag(λ)·Q, importance on them, pruning that removes the least.

The end-to-end test trains four independent 64x64 maps towards target updates of known spectra on the shipped
defaults (lora_like start, eq. 2 at γ, the project's param groups), then checks that `importance_scores()` is eq. 3
of the singular values of each `delta_weight()` and that an event's prune costs what the best truncation costs.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flexlora_hf import FlexLoRAConfig, get_flexlora_model
from flexlora_hf.adapter.events import run_event
from flexlora_hf.functional import ReallocationPlan, spectral_entropy
from flexlora_hf.functional.spectrum import (
    factored_singular_values,
    factored_svd,
    gram_singular_values,
    truncation_error,
)
from flexlora_hf.optim.surgery import param_groups

D = 64
NAMES = ("rank1", "flat8", "geom8", "rank2")


def _factors(draw, out: int, inn: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(out, r, generator=g, dtype=torch.float64)
    Q = torch.randn(r, inn, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["plain", "collinear", "zero_column", "zero", "scaled"]))
    if kind == "collinear" and r > 1:  # P's columns nearly parallel: what Adam makes of the lora_like start
        P = P[:, :1] + 1e-3 * P
    elif kind == "zero_column" and r > 0:
        P[:, 0] = 0
    elif kind == "zero":
        P.zero_()
    elif kind == "scaled":
        P = P * torch.logspace(-3, 3, r, dtype=torch.float64)
    lam = torch.randn(r, generator=g, dtype=torch.float64)
    return P, lam, Q


@settings(max_examples=60, deadline=None)
@given(data=st.data(), out=st.integers(1, 12), inn=st.integers(1, 12))
def test_factored_svd_matches_the_dense_svd(data, out: int, inn: int) -> None:
    r = data.draw(st.integers(0, min(out, inn)))
    P, lam, Q = _factors(data.draw, out, inn, r)
    dense = (P * lam) @ Q  # (out, in): the slow, obvious reference
    S_ref = torch.linalg.svdvals(dense)[:r]
    S = factored_singular_values(P, lam, Q)
    assert S.shape == (r,)
    scale = 1 + float(dense.abs().max()) if dense.numel() else 1.0
    torch.testing.assert_close(S, S_ref, atol=1e-9 * scale, rtol=1e-7)
    U, S2, Vh = factored_svd(P, lam, Q)
    torch.testing.assert_close((U * S2) @ Vh, dense, atol=1e-9 * scale, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(r, dtype=torch.float64), atol=1e-9, rtol=0)
    # the fast Gram path of every event: each σ² within ~ε·σ_max² (ε of float32 GEMMs for float32 factors)
    for dtype, eps in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        S3 = gram_singular_values(P.to(dtype), lam.to(dtype), Q.to(dtype))
        top = float(S_ref.max()) ** 2 if r else 0.0
        torch.testing.assert_close(S3.square(), S_ref.square(), atol=eps * (1e-30 + top), rtol=0)


class FourMaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name in NAMES:
            layer = nn.Linear(D, D, bias=False)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(D, D, generator=g) / D**0.5)
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self, name)(x) for name in NAMES]


def _targets() -> dict[str, torch.Tensor]:
    """Target updates (out, in) of known spectra: rank 1, flat rank 8, geometric rank 8, rank 2."""
    g = torch.Generator().manual_seed(1)

    def update(sigmas: list[float]) -> torch.Tensor:
        U, _ = torch.linalg.qr(torch.randn(D, len(sigmas), generator=g))
        V, _ = torch.linalg.qr(torch.randn(D, len(sigmas), generator=g))
        return (U * torch.tensor(sigmas)) @ V.T

    return {
        "rank1": update([0.5]),
        "flat8": update([0.5] * 8),
        "geom8": update([0.5 * 0.5**i for i in range(8)]),
        "rank2": update([0.5, 0.5]),
    }


@pytest.fixture(scope="module")
def trained_maps():
    """The issue's setting: default FlexLoRAConfig, r 8, events off, AdamW over the project's param groups with
    γ·eq. 2, lr 5e-4, 600 steps."""
    torch.manual_seed(0)
    model = get_flexlora_model(FourMaps(), FlexLoRAConfig(r=8, b0=0, target_modules=list(NAMES), total_steps=600))
    targets = _targets()
    opt = torch.optim.AdamW(param_groups(model, lr=5e-4, weight_decay=0.0), lr=5e-4)
    gamma = model.flexlora_config.orth_reg_weight
    for _ in range(600):
        x = torch.randn(64, D)
        outs = model(x)
        loss = sum(
            ((y - getattr(model.base_model, n).base_layer(x) - x @ targets[n].T) ** 2).sum(-1).mean()  # squared error
            for n, y in zip(NAMES, outs, strict=True)
        )
        loss = loss + gamma * model.orth_reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_scores_are_eq3_of_the_real_spectrum_on_the_default_start(trained_maps) -> None:
    model, _ = trained_maps
    assert model.flexlora_config.init_basis == "lora_like"  # the shipped default, not a test-only basis
    scores = model.importance_scores()
    layers = dict(model.flexlora_layers())
    expected = {n: spectral_entropy(torch.linalg.svdvals(layers[n].delta_weight().double())[:8]) for n in NAMES}
    for name in NAMES:
        assert scores[name] == pytest.approx(expected[name], abs=0.05), (name, scores, expected)
    # and the scores tell the spectra apart: rank 1 < rank 2 < flat 8, geometric between
    assert scores["rank1"] < scores["rank2"] < scores["flat8"]
    assert scores["rank1"] < scores["geom8"] < scores["flat8"]


def test_pruning_costs_no_more_than_the_best_truncation(trained_maps) -> None:
    model, _ = trained_maps
    for name in NAMES:
        layer = dict(model.flexlora_layers())[name]
        before = layer.delta_weight().double()  # (out, in)
        best = truncation_error(torch.linalg.svdvals(before), layer.rank - 1)
        saved = {k: v.detach().clone() for k, v in layer.named_parameters() if k.startswith("lora_")}
        rank = layer.rank
        layer.prune_smallest()  # the default: rotated onto ΔW's SVD first
        cost = float(torch.linalg.matrix_norm(layer.delta_weight().double() - before))
        assert cost <= 1.5 * best + 0.02 * float(torch.linalg.matrix_norm(before)), (name, cost, best)
        with torch.no_grad():  # restore for the next test (the fixture is shared)
            for k, v in saved.items():
                getattr(layer, k).copy_(v)
            layer._set_rank(rank)


def test_rotation_keeps_delta_w_and_restarts_the_moments_of_the_rotated_matrix(trained_maps) -> None:
    model, opt = trained_maps
    layers = dict(model.flexlora_layers())
    deltas = {n: layers[n].delta_weight().double() for n in NAMES}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state}
    model.apply_plan(ReallocationPlan(prune=("geom8",), budget=1), opt, step=600)
    geom = layers["geom8"]
    S = torch.linalg.svdvals(deltas["geom8"])
    # the pruned ΔW is the best rank-7 approximation of the old one (Eckart-Young)
    err = float(torch.linalg.matrix_norm(geom.delta_weight().double() - deltas["geom8"]))
    assert err == pytest.approx(truncation_error(S, 7), rel=1e-4, abs=1e-7)
    # its directions are now the SVD: P, Q orthonormal, λ = σ / scaling, descending
    P, lam, Q = geom.lora_P.detach()[:, :7].double(), geom.lora_lam.detach()[:7].double(), geom.lora_Q.detach()[:7]
    torch.testing.assert_close(P.T @ P, torch.eye(7, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q.double() @ Q.double().T, torch.eye(7, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(lam * geom.scaling, S[:7], atol=1e-6, rtol=1e-5)
    # every moment of the rotated matrix restarts (they described directions that no longer exist) and each
    # direction gets its own Adam bias correction from this step; the other matrices' moments are untouched
    for p in (geom.lora_P, geom.lora_lam, geom.lora_Q):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(opt.state[p][key]) == 0
    assert geom.slot_birth == dict.fromkeys(range(7), 600)
    for name in ("rank1", "rank2"):
        layer = layers[name]
        torch.testing.assert_close(layer.delta_weight().double(), deltas[name], atol=0, rtol=0)
        for p in (layer.lora_P, layer.lora_lam, layer.lora_Q):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], moments[id(p)][key])


def test_an_event_with_no_spectral_information_moves_nothing(caplog) -> None:
    # lora_like at step 0: P = 0, so every ΔW is 0 and every score 0; the planner must not move rank by name
    model = get_flexlora_model(FourMaps(), FlexLoRAConfig(r=4, b0=2, target_modules=list(NAMES), total_steps=100,
                                                          t_warmup=10, t_final=10, delta_t=10))
    with caplog.at_level(logging.INFO, logger="flexlora_hf.adapter.events"):
        record = run_event(model, b=2, step=20)
    assert record["prune"] == [] and record["expand"] == []
    assert set(model.rank_map().values()) == {4}
    assert sum("nothing to choose by" in r.getMessage() for r in caplog.records) == 1


def test_a_matrix_that_just_grew_is_not_the_next_prune_target() -> None:
    model = get_flexlora_model(FourMaps(), FlexLoRAConfig(r=4, b0=1, target_modules=list(NAMES), total_steps=100,
                                                          t_warmup=10, t_final=10, delta_t=10, init_basis="orthonormal"))
    layers = dict(model.flexlora_layers())
    with torch.no_grad():  # orthonormal basis: λ is the spectrum. flat8 flat (most important), rank1 peaked
        for name, lam in {"flat8": [1.0, 1.0, 1.0, 1.0], "geom8": [1.0, 0.5, 0.25, 0.12],
                          "rank2": [1.0, 0.9, 0.1, 0.1], "rank1": [1.0, 0.01, 0.01, 0.01]}.items():
            layers[name].lora_lam[:4] = torch.tensor(lam)
    first = run_event(model, b=1, step=20)
    assert first["prune"] == ["rank1"] and first["expand"] == ["flat8"]
    with torch.no_grad():  # every other matrix now flat: more important than flat8 with its new zero direction
        layers["rank1"].lora_lam[:3] = torch.tensor([1.0, 1.0, 1.0])
        for name in ("geom8", "rank2"):
            layers[name].lora_lam[:4] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    scores = model.importance_scores()
    assert min(scores, key=scores.__getitem__) == "flat8"  # eq. 3 over 5 slots, one of them new and empty
    paper = copy.deepcopy(model)
    second = run_event(model, b=1, step=30)
    assert "flat8" not in second["prune"]  # inside its grace period it is not pruned
    paper.flexlora_config.grace_events = 0  # the paper: no grace
    third = run_event(paper, b=1, step=30)
    assert third["prune"] == ["flat8"]  # the churn the grace period prevents
    assert third["motion"]["churn"] == 1.0 and second["motion"]["churn"] == 0.0


def test_random_control_moves_the_budget_by_chance_reproducibly() -> None:
    def event(seed: int, step: int) -> dict:
        cfg = FlexLoRAConfig(r=4, b0=2, target_modules=list(NAMES), total_steps=100, t_warmup=10, t_final=10,
                             delta_t=10, importance="random", seed=seed)
        return run_event(get_flexlora_model(FourMaps(), cfg), b=2, step=step)

    a, b = event(0, 20), event(0, 20)
    assert a["scores"] == b["scores"] and a["prune"] == b["prune"]  # same seed and step: same draw
    assert len(a["prune"]) == len(a["expand"]) == 2  # ΔW = 0 here, yet the control moves the whole budget
    draws = {tuple(event(seed, step)["prune"]) for seed in range(3) for step in (20, 30)}
    assert len(draws) > 1


def test_a_v05_folder_keeps_its_in_place_prune_and_no_grace(tmp_path) -> None:
    # Resuming an adapter written before these fields existed must not switch its pruning mid-run.
    import json

    from flexlora_hf import FlexLoRAModel

    cfg = FlexLoRAConfig(r=4, b0=1, target_modules=list(NAMES), total_steps=100, t_warmup=10, t_final=10, delta_t=10)
    get_flexlora_model(FourMaps(), cfg).save_pretrained(tmp_path)
    path = tmp_path / "flexlora_config.json"
    data = json.loads(path.read_text())
    assert data["svd_prune"] is True and data["grace_events"] == 1  # v0.6 writes them
    for key in ("svd_prune", "grace_events"):
        del data[key]
    path.write_text(json.dumps(data))
    loaded = FlexLoRAModel.from_pretrained(FourMaps(), tmp_path)
    assert (loaded.flexlora_config.svd_prune, loaded.flexlora_config.grace_events) == (False, 0)
