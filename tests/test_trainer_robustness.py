"""Trainer-side robustness: the callback alone warns about eq. 2, the best-model reload keeps every event, sharded
engines and un-resettable optimizer states are refused at train start."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import lm_dataset, trainer_llama, training_args
from transformers import Trainer

from flexlora_hf import FlexLoRACallback, FlexLoRAConfig, FlexLoRATrainer, get_flexlora_model
from flexlora_hf.integrations.trainer import check_distributed_engine
from flexlora_hf.optim.surgery import UnsupportedOptimizerError, check_state_layout

SCHED = dict(r=4, lora_alpha=8, b0=2, t_warmup=4, t_final=4, delta_t=2, schedule="constant")


def test_callback_without_the_mixin_warns_once_that_eq2_is_off(tmp_path, caplog) -> None:
    fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SCHED, total_steps=12))
    trainer = Trainer(model=fm, args=training_args(str(tmp_path), max_steps=12), train_dataset=lm_dataset(),
                      callbacks=[FlexLoRACallback()])
    with caplog.at_level(logging.WARNING, logger="flexlora_hf.integrations.trainer"):
        trainer.train()
    hits = [r for r in caplog.records if "NOT added to the loss" in r.getMessage()]
    assert len(hits) == 1 and "FlexLoRATrainerMixin" in hits[0].getMessage()
    assert fm.rank_history  # the events still happened

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexlora_hf.integrations.trainer"):
        FlexLoRATrainer(model=trainer_llama(), args=training_args(str(tmp_path / "b"), max_steps=12),
                        train_dataset=lm_dataset(), flexlora_config=FlexLoRAConfig(**SCHED)).train()
    assert not [r for r in caplog.records if "NOT added to the loss" in r.getMessage()]


def test_best_model_reload_keeps_every_event(tmp_path) -> None:
    args = training_args(
        str(tmp_path), max_steps=16, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
    )
    trainer = FlexLoRATrainer(model=trainer_llama(), args=args, train_dataset=lm_dataset(),
                              eval_dataset=lm_dataset(n=16, seed=1), flexlora_config=FlexLoRAConfig(**SCHED))
    trainer.train()
    history = trainer.flexlora_model.rank_history
    events = [e["step"] for e in history if "loaded_best_model_checkpoint" not in e]
    assert events == [6, 8, 10, 12]  # every event of the run, also those after the best checkpoint
    last = history[-1]
    assert last["loaded_best_model_checkpoint"] == trainer.state.best_model_checkpoint
    assert last["ranks"] == trainer.flexlora_model.rank_map()  # the model now holds the best checkpoint's ranks


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_engines_are_refused_clearly(tmp_path, engine: str) -> None:
    args = training_args(str(tmp_path))
    setattr(args, engine, ["full_shard"] if engine == "fsdp" else {"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match=r"(?s)does not support (FSDP|DeepSpeed).*Use DDP"):
        check_distributed_engine(args)


class _QuantisedState(torch.Tensor):
    """Stands in for a low-bit optimizer state (a tensor subclass, as torchao's 4-bit AdamW keeps)."""


class _LowBitSGD(torch.optim.SGD):
    """SGD with momentum whose buffers are tensor subclasses; the class name says nothing about bits."""

    def step(self, closure=None):  # type: ignore[override]
        out = super().step(closure)
        for state in self.state.values():
            if "momentum_buffer" in state and type(state["momentum_buffer"]) is torch.Tensor:
                state["momentum_buffer"] = state["momentum_buffer"].as_subclass(_QuantisedState)
        return out


def test_optimizer_with_unresettable_state_is_refused_after_its_first_step(tmp_path) -> None:
    fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SCHED, total_steps=12))
    layers = [layer for _, layer in fm.flexlora_layers()]
    opt = _LowBitSGD([p for p in fm.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    trainer = FlexLoRATrainer(model=fm, args=training_args(str(tmp_path), max_steps=12),
                              train_dataset=lm_dataset(), optimizers=(opt, None))
    with pytest.raises(UnsupportedOptimizerError, match="_LowBitSGD"):
        trainer.train()
    assert trainer.state.global_step == 1  # refused after the first step, long before the first event (step 6)
    plain = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randint(0, 64, (2, 8))
    fm(input_ids=x, labels=x).loss.backward()
    plain.step()
    check_state_layout(plain, layers)  # plain tensors: accepted


def test_lora_typical_rate_gets_one_hint_for_a_late_basis(tmp_path, caplog) -> None:
    """The λ = 0 bases learned late at LoRA's rate on the decoder check: one line; the default basis gets none."""

    def hints(out: str, lr: float, **cfg) -> list[logging.LogRecord]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flexlora_hf.integrations.trainer"):
            FlexLoRATrainer(model=trainer_llama(), args=training_args(str(tmp_path / out), learning_rate=lr),
                            train_dataset=lm_dataset(), flexlora_config=FlexLoRAConfig(**SCHED, **cfg))
        return [r for r in caplog.records if "LoRA-typical rate" in r.getMessage()]

    late = hints("a", 1e-3, init_basis="orthonormal")
    assert len(late) == 1 and "docs/benchmarks.md" in late[0].getMessage() and "lora_like" in late[0].getMessage()
    assert not hints("b", 5e-3, init_basis="orthonormal")
    assert not hints("c", 1e-3)  # the default lora_like basis
