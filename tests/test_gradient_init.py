"""init_from_gradient (gradient_init.py): the basis rotates onto the weight gradient's singular subspace; nothing else
changes (output exact, λ = 0, eq. 2 = 0, gradients restored); refusals; the Trainer does it once, on a fresh run."""

from __future__ import annotations

import pytest
import torch
from helpers import cls_dataset, flex_config, inputs, lm_dataset, logits, tiny_gpt2, tiny_llama, trainer_bert
from helpers import training_args as make_args
from torch import nn
from transformers.pytorch_utils import Conv1D

from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer, align_to_gradient, get_flexlora_model
from flexlora_hf.gradient_init import is_fresh


class OneProjection(nn.Module):
    """y = proj(x): the weight gradient of the loss sum(y * D) over rows X is exactly Dᵀ X (out, in)."""

    def __init__(self, d_in: int, d_out: int, conv1d: bool) -> None:
        super().__init__()
        self.proj = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _target_gradient(d_out: int, d_in: int, spectrum: list[float], seed: int) -> torch.Tensor:
    """G = U diag(spectrum) Vᵀ (out, in) with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))  # (out, k)
    V, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))  # (in, k)
    return (U * torch.tensor(spectrum, dtype=torch.float64)) @ V.T  # (out, in)


def _setup(G: torch.Tensor, r: int, conv1d: bool = False):
    d_out, d_in = G.shape
    fm = get_flexlora_model(
        OneProjection(d_in, d_out, conv1d).double(),
        FlexLoRAConfig(r=r, lora_alpha=2.0 * r, target_modules=["proj"], b0=0, total_steps=None, init_from_gradient=True, init_basis="orthonormal"),
    ).double()  # the adapter too (it is created in the default dtype)
    X = torch.eye(d_in, dtype=torch.float64)  # (in, in): rows are the unit vectors, so Dᵀ X = Dᵀ
    D = G.T.contiguous()  # (in, out): dL/dy for each row, chosen so that dL/dW = G

    def loss_fn() -> torch.Tensor:
        return (fm(X) * D).sum()

    layer = fm.get_submodule("proj")
    return fm, layer, loss_fn


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_recovers_a_low_rank_gradient_exactly_and_changes_nothing_else(conv1d: bool) -> None:
    G = _target_gradient(12, 20, [5.0, 3.0, 1.0], seed=0)  # rank 3 < r = 4: the range finder is exact
    fm, layer, loss_fn = _setup(G, r=4, conv1d=conv1d)
    x = torch.randn(5, 20, dtype=torch.float64)
    with torch.no_grad():
        before = fm(x)
    sentinel = torch.full_like(layer.lora_Q, 7.0)
    layer.lora_Q.grad = sentinel.clone()  # a gradient already there (e.g. mid-accumulation) comes back untouched

    stats = align_to_gradient(fm, loss_fn)

    assert stats == {"aligned": 1, "skipped": 0} and fm.gradient_aligned
    P, lam, Q = layer.lora_P[:, :4].detach(), layer.lora_lam.detach(), layer.lora_Q[:4].detach()
    assert torch.equal(lam, torch.zeros_like(lam))  # λ exactly 0 again ...
    with torch.no_grad():
        assert torch.equal(fm(x), before)  # ... so the model is exactly the base model
    assert float(layer.orth_reg().detach()) < 1e-24  # still orthonormal: eq. 2 = 0
    assert torch.allclose(P @ (P.T @ G), G, atol=1e-12)  # G's column space inside span(P)
    assert torch.allclose((G @ Q.T) @ Q, G, atol=1e-12)  # G's row space inside span(Q)
    core = P.T @ G @ Q.T  # (r, r): the pairs are G's singular pairs, largest first
    assert torch.allclose(core.diagonal().abs()[:3], torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(core - torch.diag(core.diagonal()), torch.zeros(4, 4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(layer.lora_Q.grad, sentinel) and layer.lora_P.grad is None


def test_power_iterations_find_the_top_subspace_of_a_full_rank_gradient() -> None:
    spectrum = [10.0, 9.0, 8.0, 7.0] + [0.5] * 8
    G = _target_gradient(16, 24, spectrum, seed=1)  # full rank 12, a gap after the 4th value
    U, _, Vh = torch.linalg.svd(G)
    fm, layer, loss_fn = _setup(G, r=4)
    P0, Q0 = layer.lora_P[:, :4].detach().clone(), layer.lora_Q[:4].detach().clone()

    def captured(P: torch.Tensor, Q: torch.Tensor) -> float:
        return float((P.T @ G @ Q.T).norm() ** 2 / (torch.tensor(spectrum[:4]) ** 2).sum())

    align_to_gradient(fm, loss_fn, passes=8)
    P, Q = layer.lora_P[:, :4].detach(), layer.lora_Q[:4].detach()
    # The subspace is G's top-4 (projector distance), and the random start captured almost none of the energy.
    assert torch.linalg.matrix_norm(P @ P.T - U[:, :4] @ U[:, :4].T) < 1e-6
    assert torch.linalg.matrix_norm(Q.T @ Q - Vh[:4].T @ Vh[:4]) < 1e-6
    assert captured(P, Q) > 0.999 > 0.2 > captured(P0, Q0)


def test_first_lambda_gradient_is_the_singular_value() -> None:
    """The point of it: after alignment λ_i's first gradient is s·σ_i (with the random basis, a projection ~0)."""
    G = _target_gradient(12, 20, [4.0, 2.0], seed=2)
    fm, layer, loss_fn = _setup(G, r=2)
    loss_fn().backward()
    random_grad = layer.lora_lam.grad[:2].abs().clone()
    layer.lora_lam.grad = None
    align_to_gradient(fm, loss_fn)
    loss_fn().backward()
    aligned = layer.lora_lam.grad[:2].abs()
    assert torch.allclose(aligned, layer.scaling * torch.tensor([4.0, 2.0], dtype=torch.float64), atol=1e-12)
    assert float(random_grad.sum()) < 0.5 * float(aligned.sum())


def test_a_module_outside_the_graph_keeps_its_basis() -> None:
    fm = get_flexlora_model(tiny_llama(eval_mode=False), flex_config(init_from_gradient=True, init_basis="orthonormal"))
    names = fm.module_names
    unused = dict(fm.flexlora_layers())[next(n for n in names if n.endswith("q_proj"))]  # no module feeds only it
    before = unused.lora_P.detach().clone()
    hook = unused.register_forward_hook(lambda m, i, o: o.detach())  # cut this module's adapter out of the graph
    try:
        stats = align_to_gradient(fm, lambda: fm(**inputs(), labels=inputs()["input_ids"]).loss)
    finally:
        hook.remove()
    assert stats == {"aligned": len(names) - 1, "skipped": 1}
    assert torch.equal(unused.lora_P.detach(), before)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="init_basis='orthonormal'"):
        FlexLoRAConfig(r=4, init_from_gradient=True, init_basis="gaussian")
    fm = get_flexlora_model(tiny_gpt2(eval_mode=False), flex_config(init_from_gradient=True, init_basis="orthonormal"))
    loss = lambda: fm(**inputs(), labels=inputs()["input_ids"]).loss  # noqa: E731
    with pytest.raises(ValueError, match="passes=1"):
        align_to_gradient(fm, loss, passes=1)
    before = logits(fm)
    with torch.no_grad():
        next(layer for _, layer in fm.flexlora_layers()).lora_lam[0] = 0.5
    assert not is_fresh(fm)
    with pytest.raises(ValueError, match="already been trained"):
        align_to_gradient(fm, loss)
    assert not torch.equal(logits(fm), before)  # (the refusal changed nothing: the λ set above is what moved it)


@pytest.mark.parametrize("enabled", [True, False])
def test_trainer_aligns_once_on_a_fresh_run(tmp_path, enabled: bool) -> None:
    cfg = flex_config(init_from_gradient=enabled, init_basis="orthonormal", b0=0)
    trainer = FlexLoRATrainer(
        model=trainer_bert(),
        args=make_args(str(tmp_path), max_steps=2, learning_rate=0.0, lr_scheduler_type="constant"),
        train_dataset=cls_dataset(),
        flexlora_config=cfg,
    )
    fm = trainer.flexlora_model
    start = {n: layer.lora_P.detach().clone() for n, layer in fm.flexlora_layers()}
    trainer.train()
    moved = [not torch.equal(layer.lora_P.detach(), start[n]) for n, layer in fm.flexlora_layers()]
    assert fm.gradient_aligned is enabled
    assert all(moved) if enabled else not any(moved)  # lr 0: only the alignment can move P
    assert all(not layer.lora_lam.detach().any() for _, layer in fm.flexlora_layers())
    assert max(float(layer.orth_reg().detach()) for _, layer in fm.flexlora_layers()) < 1e-9


def test_trainer_keeps_the_basis_of_an_adapter_that_was_already_trained(tmp_path) -> None:
    fm = get_flexlora_model(tiny_llama(eval_mode=False, vocab_size=64), flex_config(init_from_gradient=True, init_basis="orthonormal", b0=0))
    with torch.no_grad():
        for _, layer in fm.flexlora_layers():
            layer.lora_lam[: layer.rank] = 0.01  # e.g. loaded from a saved adapter to train further
    start = [layer.lora_P.detach().clone() for _, layer in fm.flexlora_layers()]
    args = make_args(str(tmp_path), max_steps=1, learning_rate=0.0, lr_scheduler_type="constant")
    FlexLoRATrainer(model=fm, args=args, train_dataset=lm_dataset()).train()
    assert not fm.gradient_aligned
    assert all(torch.equal(layer.lora_P.detach(), s) for (_, layer), s in zip(fm.flexlora_layers(), start, strict=True))
