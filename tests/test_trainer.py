"""FlexLoRATrainer / FlexLoRACallback behaviour on tiny random models (real Trainer runs, no mocks)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import cls_dataset, lm_dataset, trainer_bert, trainer_llama, training_args
from transformers import Trainer, TrainerCallback

from flexlora_hf import FlexLoRACallback, FlexLoRAConfig, FlexLoRATrainer, get_flexlora_model
from flexlora_hf.functional.allocation import ReallocationPlan
from flexlora_hf.integrations.trainer import unwrap_flexlora
from flexlora_hf.optim.surgery import unwrap_optimizer

SCHED = dict(r=4, lora_alpha=8, b0=2, t_warmup=4, t_final=4, delta_t=2, schedule="constant")


def _run(model, tmp_path, ds, cfg_kwargs=None, callbacks=None, **arg_overrides):
    cfg = FlexLoRAConfig(**{**SCHED, **(cfg_kwargs or {})})
    trainer = FlexLoRATrainer(
        model=model,
        args=training_args(str(tmp_path), **arg_overrides),
        train_dataset=ds,
        flexlora_config=cfg,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


class _OrthReg(TrainerCallback):
    """The model's orthogonality term R at the start of every optimizer step (the parameters the step's loss sees)."""

    def __init__(self):
        self.values: dict[int, float] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            self.values[state.global_step + 1] = float(unwrap_flexlora(model).orth_reg())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_events_move_ranks_and_conserve_total(tmp_path, kind):
    model, ds = (trainer_llama(), lm_dataset()) if kind == "llama" else (trainer_bert(), cls_dataset())
    orth = _OrthReg()
    trainer = _run(model, tmp_path, ds, callbacks=[orth])
    fm = trainer.flexlora_model
    hist = fm.rank_history
    # constant b0=2 on steps 6, 8, ..., 20 (window (4, 20], grid 2)
    assert [h["step"] for h in hist] == list(range(6, 21, 2))
    initial_total = 4 * len(fm.module_names)
    for h in hist:
        assert sum(h["ranks"].values()) == initial_total
        assert len(h["prune"]) == len(h["expand"]) <= 2
        assert not set(h["prune"]) & set(h["expand"])
    assert fm.total_rank() == initial_total
    assert fm.rank_map() != {n: 4 for n in fm.module_names}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # written at train end: the JSON record of every event
    with open(os.path.join(tmp_path, "rank_history.json")) as f:
        assert json.load(f) == json.loads(json.dumps(hist))
    # Every training log carries orth_reg = the mean of the model's R over the steps since the previous log; the
    # logs after events also carry the event's moves.
    logged = {e["step"]: e["orth_reg"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == [4, 8, 12, 16, 20, 24]
    assert any("flexlora/moves" in e for e in trainer.state.log_history)
    for step, value in logged.items():
        window = [orth.values[s] for s in range(step - 3, step + 1)]
        assert value == pytest.approx(sum(window) / len(window), abs=1e-6), step


def test_inactive_slots_stay_exactly_zero_with_zero_moments(tmp_path):
    trainer = _run(trainer_llama(), tmp_path, lm_dataset())
    opt = unwrap_optimizer(trainer.optimizer)
    pruned_any = False
    for _, layer in trainer.flexlora_model.flexlora_layers():
        off = ~layer.lora_active
        pruned_any |= bool(off[: layer.r_init].any())
        assert torch.equal(layer.lora_P[:, off], torch.zeros_like(layer.lora_P[:, off]))
        assert torch.equal(layer.lora_lam[off], torch.zeros_like(layer.lora_lam[off]))
        assert torch.equal(layer.lora_Q[off], torch.zeros_like(layer.lora_Q[off]))
        for p, dim in ((layer.lora_P, 1), (layer.lora_lam, 0), (layer.lora_Q, 0)):
            st = opt.state[p]
            idx = torch.nonzero(off).flatten()
            assert torch.equal(st["exp_avg"].index_select(dim, idx), torch.zeros_like(st["exp_avg"].index_select(dim, idx)))
    assert pruned_any, "the schedule should have pruned at least one initial direction"


class _StateSnapshot(TrainerCallback):
    """Copies optimizer state / LR right before and right after the FlexLoRA callback's on_step_end."""

    def __init__(self, store, key):
        self.store, self.key = store, key

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        self.store.setdefault(state.global_step, {})[self.key] = {
            id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()
        }
        self.store[state.global_step][self.key + "_lr"] = lr_scheduler.get_last_lr()


def test_untouched_moments_bit_identical_and_lr_unchanged(tmp_path):
    store: dict = {}
    before = _StateSnapshot(store, "before")
    cfg = FlexLoRAConfig(**SCHED)
    trainer = FlexLoRATrainer(
        model=trainer_llama(),
        args=training_args(str(tmp_path)),
        train_dataset=lm_dataset(),
        flexlora_config=cfg,
        callbacks=[before],  # runs before the FlexLoRA callback, which is appended after user callbacks
    )
    trainer.add_callback(_StateSnapshot(store, "after"))
    trainer.train()
    fm = trainer.flexlora_model
    touched_params = {}
    for h in fm.rank_history:
        for name in h["prune"] + h["expand"]:
            layer = fm.base_model.get_submodule(name)
            touched_params.setdefault(h["step"], set()).update(
                {id(layer.lora_P), id(layer.lora_lam), id(layer.lora_Q)}
            )
    assert touched_params
    for step, snap in store.items():
        b, a = snap["before"], snap["after"]
        assert snap["before_lr"] == snap["after_lr"]
        for pid in b:
            for k in b[pid]:
                if pid in touched_params.get(step, set()) and k != "step":
                    continue
                assert torch.equal(b[pid][k], a[pid][k]), (step, k)
    # The LR schedule of a run with events equals the one without any event.
    lrs_events = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    plain = _run(trainer_llama(), tmp_path / "plain", lm_dataset(), cfg_kwargs={"b0": 0})
    lrs_plain = [e["learning_rate"] for e in plain.state.log_history if "learning_rate" in e]
    assert lrs_events == lrs_plain
    assert plain.flexlora_model.rank_history == []


def test_new_direction_leaves_output_unchanged():
    fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SCHED, total_steps=24))
    with torch.no_grad():
        for _, layer in fm.flexlora_layers():
            layer.lora_lam[:4] = torch.randn(4)
    x = torch.randint(0, 64, (2, 9))
    before = fm(input_ids=x).logits
    names = fm.module_names[:3]
    fm.apply_plan(ReallocationPlan(expand=tuple(names)), step=6)
    assert torch.equal(fm(input_ids=x).logits, before)
    assert [fm.rank_map()[n] for n in names] == [5, 5, 5]


def test_gradient_accumulation_gives_same_rank_decisions(tmp_path):
    # float64: in float32 the two summation orders differ in the last bits, and Adam's normalisation of the tiny
    # first gradients of unit-norm new directions amplifies that to ~1e-4 in λ; in float64 the paths agree to 1e-9.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a = _run(trainer_llama(), tmp_path / "a", lm_dataset(), per_device_train_batch_size=8)
        b = _run(
            trainer_llama(), tmp_path / "b", lm_dataset(), per_device_train_batch_size=4, gradient_accumulation_steps=2
        )
    finally:
        torch.set_default_dtype(default)
    ha, hb = a.flexlora_model.rank_history, b.flexlora_model.rank_history
    assert [(h["step"], h["prune"], h["expand"]) for h in ha] == [(h["step"], h["prune"], h["expand"]) for h in hb]
    assert a.flexlora_model.rank_map() == b.flexlora_model.rank_map()
    for (_, la), (_, lb) in zip(a.flexlora_model.flexlora_layers(), b.flexlora_model.flexlora_layers(), strict=True):
        assert la.lora_lam.dtype == torch.float64
        torch.testing.assert_close(la.lora_lam, lb.lora_lam, atol=1e-5, rtol=1e-4)


def _first_step_grads(tmp_path, make_model, ds, gamma, ga, compute_loss_func=None, logs=None, **arg_overrides):
    """Gradients of every adapter P right before the first optimizer step (the run's log history goes to `logs`)."""
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                grads.update({n: p.grad.clone() for n, p in model.named_parameters() if "lora_P" in n})

    trainer = FlexLoRATrainer(
        model=make_model(),
        args=training_args(
            str(tmp_path),
            per_device_train_batch_size=8 // ga,
            gradient_accumulation_steps=ga,
            max_steps=12,
            **arg_overrides,
        ),
        train_dataset=ds,
        flexlora_config=FlexLoRAConfig(**{**SCHED, "orth_reg_weight": gamma}),
        callbacks=[Grab()],
        compute_loss_func=compute_loss_func,
    )
    trainer.train()
    if logs is not None:
        logs.extend(trainer.state.log_history)
    return grads


def _orth_reg_grads(make_model) -> dict[str, torch.Tensor]:
    """∇R for every adapter P at initialisation (what γ=1 must add to the first step's gradients)."""
    fm = get_flexlora_model(make_model(), FlexLoRAConfig(**SCHED, total_steps=12))
    fm.finalize_capacity(12)
    fm.orth_reg().backward()
    return {n: p.grad for n, p in fm.named_parameters() if "lora_P" in n}


def _causal_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum")
    return loss / num_items_in_batch


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        "llama_num_items",  # model accepts loss kwargs: Trainer does not divide by GA, we must
        "bert_mean_loss",  # plain mean loss: Trainer divides the whole loss (ours included) by GA
        "llama_compute_loss_func",  # user loss function: same rule as num_items
    ],
)
def test_orth_term_enters_each_optimizer_step_once(tmp_path, ga, case):
    # grad(γ=1) - grad(γ=0) at the first step must be exactly ∇R whatever GA / loss scaling the Trainer applies.
    make, ds = (trainer_bert, cls_dataset()) if case == "bert_mean_loss" else (trainer_llama, lm_dataset())
    fn = _causal_loss if case == "llama_compute_loss_func" else None
    g1 = _first_step_grads(tmp_path / "g1", make, ds, 1.0, ga, fn)
    g0 = _first_step_grads(tmp_path / "g0", make, ds, 0.0, ga, fn)
    expected = _orth_reg_grads(make)
    assert expected.keys() == g1.keys()
    for n, grad in expected.items():
        torch.testing.assert_close(g1[n] - g0[n], grad, atol=2e-5, rtol=1e-3)


def test_trainer_subclass_with_callback_performs_events(tmp_path):
    class MyTrainer(Trainer):
        pass

    fm = get_flexlora_model(trainer_bert(), FlexLoRAConfig(**SCHED, total_steps=24))
    trainer = MyTrainer(
        model=fm, args=training_args(str(tmp_path)), train_dataset=cls_dataset(), callbacks=[FlexLoRACallback()]
    )
    trainer.train()
    assert len(fm.rank_history) == 8
    assert fm.total_rank() == 4 * len(fm.module_names)


def test_callback_without_capacity_fails_at_start(tmp_path):
    fm = get_flexlora_model(trainer_bert(), FlexLoRAConfig(**SCHED))
    trainer = Trainer(
        model=fm, args=training_args(str(tmp_path)), train_dataset=cls_dataset(), callbacks=[FlexLoRACallback()]
    )
    with pytest.raises(ValueError, match="total_steps or max_rank"):
        trainer.train()


def test_impossible_schedule_fails_at_train_start(tmp_path):
    with pytest.raises(ValueError, match="t_warmup \\+ t_final"):
        _run(trainer_bert(), tmp_path, cls_dataset(), cfg_kwargs={"t_warmup": 12, "t_final": 12})
    with pytest.raises(ValueError, match="no event"):
        _run(trainer_bert(), tmp_path, cls_dataset(), cfg_kwargs={"delta_t": 50})
    # b0 larger than the matrices allow is clamped (paper §4.2); only a move that can never happen raises
    with pytest.raises(ValueError, match="needs at least 2 adapted matrices"):
        _run(trainer_bert(), tmp_path, cls_dataset(), cfg_kwargs={"b0": 1, "target_modules": ["bert.pooler.dense"]})


def test_orth_reg_applied_with_label_smoothing(tmp_path):
    # With label smoothing the Trainer computes the loss itself (label_smoother) instead of the model. γ·R must still
    # reach the gradients: grad(γ=1) - grad(γ=0) at the first step is exactly ∇R. And R is logged only when γ > 0.
    logs1, logs0 = [], []
    g1 = _first_step_grads(tmp_path / "g1", trainer_bert, cls_dataset(), 1.0, 1, logs=logs1, label_smoothing_factor=0.1)
    g0 = _first_step_grads(tmp_path / "g0", trainer_bert, cls_dataset(), 0.0, 1, logs=logs0, label_smoothing_factor=0.1)
    expected = _orth_reg_grads(trainer_bert)
    assert expected.keys() == g1.keys()
    for n, grad in expected.items():
        torch.testing.assert_close(g1[n] - g0[n], grad, atol=2e-5, rtol=1e-3)
    assert [("orth_reg" in e) for e in logs1 if "loss" in e] == [True, True, True]  # steps 4, 8, 12
    assert [("orth_reg" in e) for e in logs0 if "loss" in e] == [False, False, False]


def test_lambda_is_not_weight_decayed(tmp_path):
    cfg = {"t_warmup": 2, "t_final": 2}
    trainer = _run(trainer_bert(), tmp_path, cls_dataset(), weight_decay=0.1, max_steps=8, cfg_kwargs=cfg)
    opt = unwrap_optimizer(trainer.optimizer)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for _, layer in trainer.flexlora_model.flexlora_layers():
        assert id(layer.lora_lam) not in decayed
        assert id(layer.lora_P) in decayed and id(layer.lora_Q) in decayed
        # every adapter tensor at the optimizer's rate (the paper's single rate); P and Q decayed like any weight
        for t in (layer.lora_lam, layer.lora_P, layer.lora_Q):
            assert group_of[id(t)]["initial_lr"] == pytest.approx(trainer.args.learning_rate)
        assert group_of[id(layer.lora_P)]["weight_decay"] == 0.1
    others = [p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n]  # the head
    assert others and all(group_of[id(p)]["initial_lr"] == pytest.approx(trainer.args.learning_rate) for p in others)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    cfg = dict(SCHED)
    full = _run(trainer_llama(), tmp_path / "full", lm_dataset(), cfg_kwargs=cfg, save_strategy="steps", save_steps=8)
    ckpt = tmp_path / "full" / "checkpoint-8"
    assert (ckpt / "flexlora_config.json").is_file()
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists(), "checkpoints must hold the adapter, never the full base model"
    resumed = FlexLoRATrainer(
        model=trainer_llama(),
        args=training_args(str(tmp_path / "resumed"), save_strategy="no"),
        train_dataset=lm_dataset(),
        flexlora_config=FlexLoRAConfig(**cfg),
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    fa, fb = full.flexlora_model, resumed.flexlora_model
    assert fa.rank_map() == fb.rank_map()
    assert [h["step"] for h in fb.rank_history] == [h["step"] for h in fa.rank_history]
    assert [(h["prune"], h["expand"]) for h in fb.rank_history] == [(h["prune"], h["expand"]) for h in fa.rank_history]
    for (_, la), (_, lb) in zip(fa.flexlora_layers(), fb.flexlora_layers(), strict=True):
        assert torch.equal(la.lora_active, lb.lora_active)
        torch.testing.assert_close(la.lora_P, lb.lora_P, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.lora_lam, lb.lora_lam, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.lora_Q, lb.lora_Q, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_run_performs_events(tmp_path):
    # CPU autocast (bf16=True) exercises the mixed-precision path; the adapter stays float32 (the master weights).
    trainer = _run(trainer_llama(), tmp_path, lm_dataset(), bf16=True, max_steps=12, cfg_kwargs={"t_warmup": 2, "t_final": 2})
    fm = trainer.flexlora_model
    assert len(fm.rank_history) == 4
    assert all(layer.lora_P.dtype == torch.float32 for _, layer in fm.flexlora_layers())
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("optim", ["paged_adamw_32bit", "sgd", "adamw_torch_fused"])
def test_supported_optimizers_perform_events(tmp_path, optim):
    pytest.importorskip("bitsandbytes")
    trainer = _run(trainer_bert(), tmp_path, cls_dataset(), optim=optim, max_steps=8, cfg_kwargs={"t_warmup": 2, "t_final": 2})
    assert len(trainer.flexlora_model.rank_history) == 2


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"])
def test_unsupported_optimizers_fail_at_train_start(tmp_path, optim):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="adamw_torch"):
        _run(trainer_bert(), tmp_path, cls_dataset(), optim=optim, max_steps=8, cfg_kwargs={"t_warmup": 2, "t_final": 2})


def test_all_linear_skips_layers_inside_modules_to_save():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    fm = get_flexlora_model(RobertaForSequenceClassification(cfg), FlexLoRAConfig(r=4, b0=1))
    assert fm.flexlora_config.modules_to_save == ["classifier"]
    assert not any(n.startswith("classifier") for n in fm.module_names)
    assert all(p.requires_grad for p in fm.base_model.classifier.parameters())
