"""`model.update_and_allocate` in a custom loop makes the same rank decisions as `FlexLoRATrainer`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from helpers import trainer_llama
from transformers import LlamaForCausalLM, TrainingArguments

from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer, get_flexlora_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_loop.py"
STEPS = 24


def _example():
    spec = importlib.util.spec_from_file_location("accelerate_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["accelerate_loop"] = module
    spec.loader.exec_module(module)
    return module


def _base() -> LlamaForCausalLM:
    return trainer_llama(seed=0)


def _rows() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 48, (32, 1), generator=g)
    return ((start + torch.arange(12)) % 64).tolist()  # token i+1 follows token i: a pattern the loss can learn


def _config() -> FlexLoRAConfig:
    # constant b(t): eq. 4 would fire only once in so short a run, and the test wants several events
    return FlexLoRAConfig(
        r=4, lora_alpha=8, b0=2, t_warmup=4, t_final=4, delta_t=4, orth_reg_weight=0.1, schedule="constant",
    )  # fmt: skip


def _decisions(model) -> list[tuple[int, list[str], list[str]]]:
    return [(e["step"], e["prune"], e["expand"]) for e in model.rank_history]


@pytest.mark.parametrize("use_accelerate", [False, True], ids=["plain", "accelerate"])
def test_manual_loop_and_trainer_make_the_same_rank_decisions(tmp_path: Path, use_accelerate: bool) -> None:
    rows = _rows()
    # Trainer: sequential batches of 8, constant rate, no clipping, AdamW without decay.
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS, learning_rate=5e-3,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_steps=100, seed=0,
    )
    trainer = FlexLoRATrainer(
        model=_base(), args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
        flexlora_config=_config(),
    )
    trainer.train()
    by_trainer = trainer.flexlora_model

    # The example's loop on the same batches, in the same order.
    ids = torch.tensor(rows)
    batches = [{"input_ids": b, "labels": b} for b in ids.split(8)]
    cfg = _config()
    cfg.total_steps = STEPS
    accelerator = Accelerator(cpu=True) if use_accelerate else None  # wraps the optimizer, runs backward
    by_loop = _example().train_loop(
        get_flexlora_model(_base(), cfg), batches, max_steps=STEPS, learning_rate=5e-3, accelerator=accelerator
    )

    assert len(by_trainer.rank_history) == 4  # events after steps 8, 12, 16, 20
    assert _decisions(by_loop) == _decisions(by_trainer)
    assert any(e["prune"] for e in by_loop.rank_history), "no rank moved: the comparison would be empty"
    assert by_loop.rank_map() == by_trainer.rank_map()
    for (name, a), (_, b) in zip(by_loop.flexlora_layers(), by_trainer.flexlora_layers(), strict=True):
        torch.testing.assert_close(a.lora_lam, b.lora_lam, rtol=1e-4, atol=1e-5, msg=name)


def test_update_and_allocate_is_a_no_op_off_the_schedule() -> None:
    cfg = _config()
    cfg.total_steps = STEPS
    model = get_flexlora_model(_base(), cfg)
    before = {n: layer.lora_lam.clone() for n, layer in model.flexlora_layers()}
    assert [model.update_and_allocate(t) for t in (1, 4, 7, 21, 24)] == [None] * 5  # 4: warmup; 21: grid; 24: final
    assert model.rank_history == []
    assert all(torch.equal(before[n], layer.lora_lam) for n, layer in model.flexlora_layers())
    assert model.update_and_allocate(8) is not None and len(model.rank_history) == 1


def test_update_and_allocate_needs_total_steps() -> None:
    model = get_flexlora_model(_base(), _config())
    try:
        model.update_and_allocate(8)
    except ValueError as err:
        assert "total_steps" in str(err)
    else:
        raise AssertionError("expected a ValueError naming total_steps")
