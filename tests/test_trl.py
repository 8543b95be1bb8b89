"""FlexLoRA through TRL's `SFTTrainer` (`FlexLoRASFTTrainer`): completion and chat data, the refusals, a 4-bit base.

Fast tests run on a tiny random Llama built from a config and a byte-level BPE tokenizer (with a ChatML-style chat
template) trained on local text in well under a second, with a schedule short enough that reallocation events happen
within a dozen optimizer steps. The slow test runs SmolLM2-135M-Instruct loaded in 4-bit NF4 on the CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from helpers import ADAPTER_FILES, tiny_llama, train_bpe_tokenizer  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, FlexLoRASFTTrainer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's LLaMA targets
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLORS = ["red", "blue", "green", "black"]
THINGS = ["sky", "grass", "sea", "night", "rose", "leaf", "coal", "ruby"]
ANSWER = {"sky": "blue", "grass": "green", "sea": "blue", "night": "black", "rose": "red", "leaf": "green"}
ANSWER |= {"coal": "black", "ruby": "red"}


def flex_config(**overrides) -> FlexLoRAConfig:
    """Events on the Δ_T = 2 grid in (2, 12 - 2]: they fire within the tests' 12 optimizer steps."""
    fields = dict(r=4, lora_alpha=8, b0=2, t_warmup=2, t_final=2, delta_t=2, target_modules=TARGETS)
    return FlexLoRAConfig(**{**fields, **overrides})


def sft_config(output_dir: Path, **overrides) -> trl.SFTConfig:
    """SFTConfig's own defaults (gradient checkpointing on, completion-only loss for prompt/completion data)."""
    fields = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        logging_steps=4,
        max_length=48,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return trl.SFTConfig(**{**fields, **overrides})


def completion_rows(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"prompt": f"what color is the {thing} ?", "completion": f" the {thing} is {ANSWER[thing]}"}
        for thing in (rng.choice(THINGS) for _ in range(n))
    ]


def message_rows(n: int = 64, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    return [
        {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]}
        for row in completion_rows(n, seed)
    ]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A ~250-token byte-level BPE tokenizer with ChatML special tokens and chat template (trained in < 1 s)."""
    corpus = [f"{r['prompt']} {r['completion']} user assistant" for r in completion_rows(300, seed=9)]
    fast = train_bpe_tokenizer(
        corpus,
        vocab_size=250,
        special=["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=64,
    )
    fast.chat_template = CHATML
    return fast


def base_model(tokenizer: PreTrainedTokenizerFast, hidden: int = 32, seed: int = 0) -> torch.nn.Module:
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return tiny_llama(seed=seed, hidden=hidden, vocab_size=len(tokenizer), eval_mode=False, **ids)


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama (hidden 64: bitsandbytes' CPU 4-bit path needs out_features % 32 == 0) saved with its tokenizer."""
    out = tmp_path_factory.mktemp("tiny_llama_sft")
    base_model(tokenizer, hidden=64).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def adapter_tensors(fm: FlexLoRAModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in fm.named_parameters() if "lora_" in n}


def assert_ranks_moved(fm: FlexLoRAModel, r: int = 4) -> None:
    moves = [e for e in fm.rank_history if e["prune"] or e["expand"]]
    assert moves, f"no reallocation event moved a rank: {fm.rank_history}"
    ranks = fm.rank_map()
    assert sum(ranks.values()) == r * len(ranks)  # bidirectional moves conserve the total
    assert set(ranks.values()) != {r}, ranks


def assert_trained(before: dict[str, torch.Tensor], fm: FlexLoRAModel) -> None:
    after = adapter_tensors(fm)
    for kind in ("lora_P", "lora_Q", "lora_lam"):
        changed = [n for n in after if kind in n and not torch.equal(after[n][..., :1], before[n][..., :1])]
        assert changed, f"no {kind} tensor moved: the optimizer did not train the adapter"


def sample_batch(tokenizer, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    enc = tokenizer([r["prompt"] + r["completion"] for r in rows], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


# ---------------------------------------------------------------------------------------------- completion data
def test_sft_completion_data_reallocates_trains_and_reloads(tokenizer, tmp_path):
    fm_input = base_model(tokenizer)
    trainer = FlexLoRASFTTrainer(
        model=fm_input,
        # fp32 (SFTConfig turns bf16 autocast on, also on CPU) so the reloaded adapters can be compared exactly
        args=sft_config(tmp_path / "out", save_strategy="steps", save_steps=6, bf16=False),
        train_dataset=Dataset.from_list(completion_rows()),
        eval_dataset=Dataset.from_list(completion_rows(16, seed=1)),
        processing_class=tokenizer,
        flexlora_config=flex_config(),
    )
    fm = trainer.flexlora_model
    assert fm.get_base_model() is fm_input
    assert trainer.completion_only_loss  # SFTTrainer's own handling of prompt/completion data
    prepared = trainer.train_dataset[0]
    assert -100 in prepared["labels"] and prepared["labels"][-1] == tokenizer.eos_token_id
    before = adapter_tensors(fm)

    trainer.train()
    assert_ranks_moved(fm)
    assert_trained(before, fm)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("orth_reg" in e and "flexlora/total_rank" in e for e in logs)  # the mixin's loss hook and logging
    assert any("flexlora/moves" in e for e in logs) and all("mean_token_accuracy" in e for e in logs)  # and TRL's
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_mean_token_accuracy" in metrics

    # The fused LM head SFTTrainer installed sees the adapters: same loss as the plain forward, not the base's.
    batch = sample_batch(tokenizer, completion_rows(4, seed=2))
    fm.eval()
    with torch.no_grad():
        fused = fm(**batch, fused_lm_head=True).loss
        plain = fm(**batch).loss
        fm.disable_adapters()
        base_loss = fm(**batch, fused_lm_head=True).loss
        fm.enable_adapters()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert abs(float(base_loss) - float(fused)) > 1e-4

    # Checkpoints and save_model write the FlexLoRA adapter folder (both views); both reload to the same logits.
    assert (tmp_path / "out" / "checkpoint-6" / "flexlora_config.json").is_file()
    resumed = FlexLoRASFTTrainer(
        model=base_model(tokenizer),
        args=sft_config(tmp_path / "resumed", save_strategy="no", bf16=False),
        train_dataset=Dataset.from_list(completion_rows()),
        processing_class=tokenizer,
        flexlora_config=flex_config(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    assert resumed.state.global_step == 12 and resumed.flexlora_model.rank_map() == fm.rank_map()
    for name, tensor in adapter_tensors(resumed.flexlora_model).items():  # the same run, interrupted at step 6
        torch.testing.assert_close(tensor, adapter_tensors(fm)[name], rtol=1e-4, atol=1e-6)
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    missing = [name for name in ADAPTER_FILES if not (out / name).is_file()]
    assert not missing, missing
    assert json.loads((out / "rank_map.json").read_text()) == fm.rank_map()
    with torch.no_grad():
        expected = fm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        native = FlexLoRAModel.from_pretrained(base_model(tokenizer), str(out)).eval()
        torch.testing.assert_close(native(**batch).logits, expected)
        peft_model = PeftModel.from_pretrained(base_model(tokenizer), str(out)).eval()
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- chat data
def test_sft_chat_messages_from_a_model_id(tokenizer, base_dir, tmp_path):
    """Conversational data through the chat template; the model given as a folder, loaded as SFTTrainer would."""
    trainer = FlexLoRASFTTrainer(
        str(base_dir),
        sft_config(tmp_path / "out", model_init_kwargs={"dtype": "float32"}),
        train_dataset=Dataset.from_list(message_rows()),
        processing_class=tokenizer,
        flexlora_config=flex_config(),
    )
    fm = trainer.flexlora_model
    assert isinstance(fm.get_base_model(), AutoModelForCausalLM._model_mapping[type(fm.config)])
    assert trainer.args.model_init_kwargs is None  # consumed when loading, so SFTTrainer does not warn
    prepared = trainer.train_dataset[0]["input_ids"]
    assert prepared[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the chat template was applied
    before = adapter_tensors(fm)
    trainer.train()
    assert_ranks_moved(fm)
    assert_trained(before, fm)
    trainer.save_model()
    assert (tmp_path / "out" / "flexlora_adapter.safetensors").is_file()
    assert (tmp_path / "out" / "chat_template.jinja").is_file()  # SFTTrainer's processing class is saved alongside


# ---------------------------------------------------------------------------------------------- TRL's sft script
def test_sft_script_flow_pushes_to_the_hub(local_hub, tokenizer, base_dir, tmp_path):
    """TRL's `sft.py` flow with the model given as a Hub id: train, evaluate, save_model, push_to_hub(dataset_name=)."""
    from huggingface_hub import HfApi

    api = HfApi(token="hf_test_token")  # the `local_hub` fixture's user "tester"
    api.create_repo("tester/tiny-llama")
    api.upload_folder(folder_path=str(base_dir), repo_id="tester/tiny-llama")
    out = tmp_path / "out"
    trainer = FlexLoRASFTTrainer(
        "tester/tiny-llama",
        sft_config(out, eval_strategy="steps", eval_steps=6, hub_model_id="sft-run", hub_token="hf_test_token"),
        train_dataset=Dataset.from_list(completion_rows()),
        eval_dataset=Dataset.from_list(completion_rows(8, seed=1)),
        processing_class=tokenizer,
        flexlora_config=flex_config(),
    )
    trainer.train()
    trainer.save_model(str(out))
    trainer.push_to_hub(dataset_name="tester/colors")
    files = local_hub.files("tester/sft-run")
    missing = [name for name in ADAPTER_FILES if name not in files]
    assert not missing, missing
    assert files["rank_map.json"] == (out / "rank_map.json").read_bytes()
    assert set(json.loads(files["rank_map.json"]).values()) != {4}
    meta = yaml.safe_load(files["README.md"].decode().split("---\n", 2)[1])
    assert meta["base_model"] == "tester/tiny-llama" and meta["datasets"] == ["tester/colors"]
    assert "flexlora" in meta["tags"]
    ids = tokenizer("what color is the sky ? the sky is blue", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = FlexLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
        expected = expected.eval()(input_ids=ids).logits
        pushed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("tester/tiny-llama"), "tester/sft-run")
        torch.testing.assert_close(pushed.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- refusals
def test_sft_refuses_peft_config_with_the_fix(tokenizer, tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = base_model(tokenizer)
    with pytest.raises(ValueError, match=r"peft_config.*\n?.*flexlora_config=FlexLoRAConfig") as err:
        FlexLoRASFTTrainer(
            model=model,
            args=sft_config(tmp_path / "out"),
            train_dataset=Dataset.from_list(completion_rows(8)),
            processing_class=tokenizer,
            flexlora_config=flex_config(),
            peft_config=lora,
        )
    assert "Remove peft_config=" in str(err.value)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # refused before anything was wrapped
    with pytest.raises(ValueError, match="PeftModel.*merge_and_unload"):
        FlexLoRASFTTrainer(
            model=get_peft_model(base_model(tokenizer), lora),
            args=sft_config(tmp_path / "out"),
            train_dataset=Dataset.from_list(completion_rows(8)),
            processing_class=tokenizer,
            flexlora_config=flex_config(),
        )
    with pytest.raises(ValueError, match="no flexlora_config"):
        FlexLoRASFTTrainer(
            model=model,
            args=sft_config(tmp_path / "out"),
            train_dataset=Dataset.from_list(completion_rows(8)),
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------------------------------------- 4-bit base
def test_sft_on_a_4bit_base_keeps_the_adapter_in_fp32_and_trains(tokenizer, base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from flexlora_hf import load_base_model

    model = load_base_model(base_dir, load_in_4bit=True)
    assert model.is_loaded_in_4bit
    trainer = FlexLoRASFTTrainer(
        model=model,
        args=sft_config(tmp_path / "out", eval_strategy="steps", eval_steps=5),
        train_dataset=Dataset.from_list(completion_rows()),
        eval_dataset=Dataset.from_list(completion_rows(8, seed=1)),
        processing_class=tokenizer,
        flexlora_config=flex_config(),
    )
    fm = trainer.flexlora_model
    dtypes = {p.dtype for n, p in fm.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}, dtypes  # SFTTrainer casts a quantized model's trainable tensors to bf16
    before = adapter_tensors(fm)
    trainer.train()
    assert_ranks_moved(fm)
    assert_trained(before, fm)
    grad_norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e and e["step"] > 5]
    assert grad_norms and all(g > 0 for g in grad_norms), grad_norms  # still learning after an evaluation
    assert {p.dtype for n, p in fm.named_parameters() if "lora_" in n} == {torch.float32}


# ---------------------------------------------------------------------------------------------- slow: SmolLM2
@pytest.mark.slow
def test_sft_smollm2_4bit_completion_end_to_end(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer

    from flexlora_hf import load_base_model
    from flexlora_hf.data.assets import materialize_smollm2

    model_dir = materialize_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base_model(model_dir, load_in_4bit=True)
    trainer = FlexLoRASFTTrainer(
        model=model,
        args=sft_config(
            tmp_path / "out", max_steps=8, per_device_train_batch_size=4, learning_rate=3e-4, max_length=32
        ),
        train_dataset=Dataset.from_list(completion_rows(40)),
        processing_class=tokenizer,
        flexlora_config=flex_config(b0=2, t_warmup=1, t_final=1, delta_t=2),
    )
    fm = trainer.flexlora_model
    assert {p.dtype for n, p in fm.named_parameters() if "lora_" in n} == {torch.float32}
    before = adapter_tensors(fm)
    trainer.train()
    assert_ranks_moved(fm)
    assert_trained(before, fm)
    assert len(fm.rank_map()) == 30 * len(TARGETS)
    trainer.save_model()
    out = tmp_path / "out"
    assert all((out / name).is_file() for name in ADAPTER_FILES)
    reloaded = FlexLoRAModel.from_pretrained(load_base_model(model_dir, load_in_4bit=True), str(out))
    assert reloaded.rank_map() == fm.rank_map()
