"""4-bit (QLoRA) loading, the bitsandbytes CPU guard, FlexLoRATrainer on a 4-bit base, and the 4-bit merge refusal.

Everything runs on tiny random Llama models saved to `tmp_path` (hidden size 64 so the 4-bit layers are eligible for
bitsandbytes' CPU repacking, which needs out_features % 32 == 0).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

bnb = pytest.importorskip("bitsandbytes")

from datasets import Dataset  # noqa: E402
from helpers import lm_dataset, tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, TrainingArguments  # noqa: E402

from flexlora_hf import FlexLoRAConfig, get_flexlora_model  # noqa: E402
from flexlora_hf.adapter.quantization import (  # noqa: E402
    INSTALL_HINT,
    guard_bnb_cpu,
    is_linear4bit,
    load_base_model,
    make_bnb_config,
    require_bitsandbytes,
)

HAS_AVX512_BF16 = bool(bnb.functional.has_avx512bf16())
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's LLaMA targets


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden=64, vocab_size=128, eval_mode=False).save_pretrained(path)
    return str(path)


def lm_data(n: int = 48, seed: int = 0) -> Dataset:
    return lm_dataset(n, length=16, seed=seed, vocab_size=128, max_start=100)  # the tiny base's 128 tokens


def quantized_linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    dense = torch.nn.Linear(64, 64, bias=False)  # no bias, as in Llama (with a bias the packed path errors out)
    layer = bnb.nn.Linear4bit(
        64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantises


def input_grad_after_eval_pass(layer: torch.nn.Module) -> torch.Tensor | None:
    """Backward once, run an eval-mode no-grad forward (what Trainer.evaluate does), backward again."""
    x = torch.randn(4, 64)
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    return xg.grad


def lora_grads(model, ids: torch.Tensor) -> dict[str, float]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {
        n: (0.0 if p.grad is None else float(p.grad.abs().sum())) for n, p in model.named_parameters() if "lora_" in n
    }


# ---------------------------------------------------------------------------------------------- the guard
@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the bitsandbytes CPU defect needs AVX512-BF16")
def test_defect_is_real_without_guard():
    """The bitsandbytes 0.50 defect this package guards against: no gradient through the layer after an eval pass."""
    layer = quantized_linear()
    assert layer.support_avx512bf16_for_cpu  # bitsandbytes' default on this CPU
    grad = input_grad_after_eval_pass(layer)
    assert grad is None or grad.abs().sum() == 0
    assert layer.weight.quant_state.packing_format_for_cpu


def test_guard_keeps_gradients_after_eval_pass():
    layer = quantized_linear()
    assert guard_bnb_cpu(layer) == 1
    assert layer.support_avx512bf16_for_cpu is False
    grad = input_grad_after_eval_pass(layer)
    assert grad is not None and grad.abs().sum() > 0
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="repacking only happens with AVX512-BF16")
def test_guard_restores_an_already_repacked_weight():
    layer = quantized_linear()
    x = torch.randn(4, 64)
    layer.train()
    reference = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        layer(x)  # repacks
    assert layer.weight.quant_state.packing_format_for_cpu
    guard_bnb_cpu(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu
    layer.train()
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # only the double-quantised absmax is re-quantised: far below the 4-bit rounding error
    torch.testing.assert_close(out.detach(), reference, rtol=2e-2, atol=2e-3)


def test_guard_ignores_models_without_4bit_layers():
    assert guard_bnb_cpu(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


# ---------------------------------------------------------------------------------------------- loading
def test_load_base_model_4bit_on_cpu(tiny_dir):
    model = load_base_model(tiny_dir, load_in_4bit=True)
    q4 = [m for m in model.modules() if is_linear4bit(m)]
    assert len(q4) == 2 * 7  # every projection of both layers; lm_head stays full precision
    assert all(m.support_avx512bf16_for_cpu is False for m in q4)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    qs = q4[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested  # NF4 with double quantisation
    assert q4[0].compute_dtype == torch.float32  # fp32 on CPU


def test_load_base_model_full_precision(tiny_dir):
    model = load_base_model(tiny_dir, gradient_checkpointing=False)
    assert not any(is_linear4bit(m) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert not model.is_gradient_checkpointing


def test_bnb_config_is_qlora():
    cfg = make_bnb_config()
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert cfg.bnb_4bit_compute_dtype in (expected, torch.float16)


def test_quantization_config_and_load_in_4bit_conflict(tiny_dir):
    with pytest.raises(ValueError, match="not both"):
        load_base_model(tiny_dir, load_in_4bit=True, quantization_config=make_bnb_config())


def test_missing_bitsandbytes_says_how_to_install(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r"flexlora_hf\[quantization\]"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match=r"flexlora_hf\[quantization\]"):
        load_base_model(tiny_dir, load_in_4bit=True)
    assert "flexlora_hf[quantization]" in INSTALL_HINT


def test_wrapping_a_user_loaded_4bit_model_applies_the_guard(tiny_dir):
    """A user who loads the 4-bit model with transformers directly is protected by get_flexlora_model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=make_bnb_config(torch.float32))
    q4 = [m for m in model.modules() if is_linear4bit(m)]
    assert q4 and all(m.support_avx512bf16_for_cpu == HAS_AVX512_BF16 for m in q4)
    fm = get_flexlora_model(
        model, FlexLoRAConfig(r=2, target_modules=TARGETS, b0=1, total_steps=10, t_warmup=2, t_final=2, delta_t=2,
                              init_basis="orthonormal")  # unit P, Q: a non-zero λ below gives every factor a gradient
    )
    assert all(m.support_avx512bf16_for_cpu is False for m in q4)
    with torch.no_grad():  # make λ non-zero so every adapter parameter gets a gradient
        for _, layer in fm.flexlora_layers():
            layer.lora_lam[layer.lora_active] = 0.1
    ids = torch.randint(0, 128, (2, 12))
    fm.eval()
    with torch.no_grad():
        fm(input_ids=ids)
    grads = lora_grads(fm, ids)
    assert all(v > 0 for n, v in grads.items() if "lora_Q" in n), grads


# ---------------------------------------------------------------------------------------------- training
def qlora_trainer(tmp_path, model, max_steps: int = 16):
    from flexlora_hf.integrations.trainer import FlexLoRATrainer

    # γ = 0: the orthogonality term would give P and Q gradients of its own and hide a dead task-loss gradient.
    cfg = FlexLoRAConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, b0=2, t_warmup=4, t_final=4, delta_t=2, orth_reg_weight=0.0
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=max_steps,
        learning_rate=1e-2,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        label_names=["labels"],  # Trainer infers none from FlexLoRAModel's class signature (reported)
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return FlexLoRATrainer(
        model=model, args=args, train_dataset=lm_data(), eval_dataset=lm_data(16, seed=1), flexlora_config=cfg
    )


def grad_norms_after_first_eval(trainer) -> list[float]:
    logs = trainer.state.log_history
    first_eval = min(e["step"] for e in logs if "eval_loss" in e)
    return [e["grad_norm"] for e in logs if "grad_norm" in e and e["step"] > first_eval]


def test_flexlora_trainer_on_4bit_base_keeps_gradients_across_evaluation(tmp_path, tiny_dir):
    """QLoRA end to end on CPU: 4-bit base, FlexLoRATrainer with reallocation events and evaluations mid-run."""
    trainer = qlora_trainer(tmp_path, load_base_model(tiny_dir, load_in_4bit=True))
    trainer.train()
    fm = trainer.flexlora_model

    logs = trainer.state.log_history
    assert [e["step"] for e in logs if "eval_loss" in e][:2] == [3, 6]
    after_eval = grad_norms_after_first_eval(trainer)
    assert len(after_eval) == 13 and all(g > 0 for g in after_eval), after_eval  # the defect would give 0.0
    losses = [e["loss"] for e in logs if "loss" in e]
    assert losses[-1] < losses[0]

    events = [r for r in fm.rank_history if r["prune"] or r["expand"]]
    assert events, "no reallocation event happened"
    ranks = fm.rank_map()
    assert sum(ranks.values()) == 2 * len(ranks)  # bidirectional moves conserve the total rank
    assert len(set(ranks.values())) > 1

    # An explicit no-grad eval pass after training, then a backward: every active direction still gets gradient.
    ids = torch.randint(0, 128, (2, 12))
    fm.eval()
    with torch.no_grad():
        fm(input_ids=ids)
    grads = lora_grads(fm, ids)
    assert all(v > 0 for n, v in grads.items() if "lora_Q" in n), grads

    # Save (native + PEFT view), reload on a fresh 4-bit base both ways: same outputs.
    from peft import PeftModel

    from flexlora_hf import FlexLoRAModel

    out_dir = tmp_path / "adapter"
    fm.save_pretrained(str(out_dir))
    assert (out_dir / "flexlora_config.json").is_file() and (out_dir / "adapter_config.json").is_file()
    fm.eval()
    with torch.no_grad():
        expected = fm(input_ids=ids).logits
    reloaded = FlexLoRAModel.from_pretrained(load_base_model(tiny_dir, load_in_4bit=True), str(out_dir))
    assert reloaded.rank_map() == fm.rank_map()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    peft_base = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=make_bnb_config(torch.float32))
    guard_bnb_cpu(peft_base)  # same fp32 4-bit kernel as ours (unguarded eval on this CPU runs a bf16 kernel)
    peft_model = PeftModel.from_pretrained(peft_base, str(out_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the bitsandbytes CPU defect needs AVX512-BF16")
def test_without_the_guard_training_silently_stops_after_evaluation(tmp_path, tiny_dir, monkeypatch):
    """Control for the test above: with the guard switched off, the same run loses its gradients after evaluating.

    q/k/v adapters reach the loss only through the unwrapped 4-bit `o_proj` and get no gradient at all; `down_proj`
    (added straight to the residual stream) and `up_proj` (reaching it through `down_proj`'s adapter branch) still
    do, so grad_norm stays > 0 and the loss still moves: the failure is silent.
    """
    from peft import prepare_model_for_kbit_training

    import flexlora_hf.adapter.model

    monkeypatch.setattr(flexlora_hf.adapter.model, "guard_bnb_cpu", lambda model: 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=make_bnb_config(torch.float32))
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = qlora_trainer(tmp_path, model, max_steps=10)
    trainer.train()
    assert all(g > 0 for g in grad_norms_after_first_eval(trainer))  # nothing looks wrong in the logs
    grads = lora_grads(trainer.flexlora_model, torch.randint(0, 128, (2, 12)))
    attention = {n: v for n, v in grads.items() if "lora_Q" in n and "self_attn" in n}
    assert len(attention) == 6 and all(v == 0 for v in attention.values()), attention
    assert all(v > 0 for n, v in grads.items() if "lora_Q" in n and "down_proj" in n)


def test_merge_into_4bit_base_is_refused(tiny_dir):
    model = load_base_model(tiny_dir, load_in_4bit=True, gradient_checkpointing=False)
    fm = get_flexlora_model(model, FlexLoRAConfig(r=2, target_modules=TARGETS, b0=0))
    with pytest.raises(ValueError, match="Refusing to merge"):
        fm.merge_and_unload()
    # nothing was modified: the adapter is still in place and usable
    assert all(type(layer).__name__ == "FlexLoRALayer" for _, layer in fm.flexlora_layers())


def test_requantising_would_lose_most_of_the_update():
    """Why the merge is refused: W + ΔW re-quantised to NF4 keeps little of a typical adapter update."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    w = torch.randn(256, 256) * 0.02
    qw, qs = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    wq = dequantize_4bit(qw, qs)
    delta = torch.randn(256, 8) @ torch.randn(8, 256)
    delta = delta / delta.std() * 1e-3
    qw2, qs2 = quantize_4bit(wq + delta, quant_type="nf4", compress_statistics=True)
    kept = float(((dequantize_4bit(qw2, qs2) - wq) * delta).sum() / (delta * delta).sum())
    assert kept < 0.6
