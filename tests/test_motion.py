"""`benchmarks.motion`: the ΔW it measures is the adapter's update, and the per-step motion it records adds up.

The benchmark itself trains SmolLM2-135M (minutes); here the same callback runs in a tiny Trainer run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import flex_config, lm_dataset, random_lambda, tiny_llama, trainer_llama, training_args
from peft import LoraConfig, get_peft_model

from flexlora_hf import FlexLoRATrainer, get_flexlora_model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the repository, not of the wheel
    sys.path.insert(0, str(ROOT))

from benchmarks import motion  # noqa: E402


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}


def test_flexlora_delta_is_what_merging_adds():
    model = tiny_llama()
    before = _base_weights(model)
    fm = get_flexlora_model(model, flex_config(target_modules=["q_proj", "v_proj"]))
    random_lambda(fm, scale=0.5)
    factors = motion.adapter_factors(fm)
    assert len(factors) == 4  # 2 layers x (q, v)
    after = _base_weights(fm.merge_and_unload())
    assert before.keys() == after.keys()
    for name, (delta, P, Q) in factors.items():
        key = next(k for k in before if name.endswith(k))
        torch.testing.assert_close(delta, after[key] - before[key], atol=1e-5, rtol=1e-4)
        assert P.shape[1] == Q.shape[0] == 4  # the active rank


def test_peft_lora_delta_is_scaling_b_a():
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    )
    factors = motion.adapter_factors(model)
    assert len(factors) == 2
    for delta, B, A in factors.values():
        torch.testing.assert_close(delta, 2.0 * B @ A)  # scaling = alpha / r
        assert B.shape == (32, 4) and A.shape == (4, 32)


def test_callback_records_every_step_and_stops(tmp_path):
    callback = motion.motion_callback(stop=20, window=10)
    trainer = FlexLoRATrainer(
        model=trainer_llama(),
        args=training_args(str(tmp_path), max_steps=30),
        train_dataset=lm_dataset(),
        flexlora_config=flex_config(
            target_modules=["q_proj", "v_proj"], total_steps=None, t_warmup=4, t_final=4, delta_t=2
        ),
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == 20  # stopped by the callback, not by max_steps
    assert [int(r["step"]) for r in callback.rows] == list(range(1, 21))
    assert callback.rows[5]["q_proj|step"] > 0 and callback.rows[5]["q_proj|dW"] > 0
    (window,) = motion.windows(callback)
    assert (window["from"], window["to"]) == (10, 20)
    q = window["q_proj"]
    assert 0 < q["net"] <= q["path"] + 1e-6  # the triangle inequality: steps add up to at least the net move
    assert q["eff"] == pytest.approx(q["net"] / q["path"])
    table = motion.format_table([{"method": "flexlora", "seed": 0, "windows": [window], "loss_curve": []}])
    assert "| 10-20 |" in table
