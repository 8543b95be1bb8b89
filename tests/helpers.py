"""Plain helpers shared by the tests (and by `ddp_train.py`, which torchrun runs as a script).

Not a test module and not a conftest: import what you need, ``from helpers import tiny_llama, training_args``
(pytest puts ``tests/`` on ``sys.path``; scripts add it themselves). Fixtures live in ``conftest.py``.

* tiny random models built from configs, nothing downloaded: `tiny_llama`, `tiny_bert` (sequence classifier),
  `tiny_gpt2` (Conv1D). One builder per architecture; keyword arguments cover the variants the tests need, and
  ``**config`` overrides any other config field. The defaults are the adapter tests' models (vocabulary of `VOCAB`,
  config-default dropout, returned in eval mode). `trainer_llama` / `trainer_bert` are the Trainer tests' models:
  the synthetic datasets' `DATA_VOCAB`-token vocabulary, no BERT dropout, left in training mode.
* synthetic token datasets for the Trainer (`lm_dataset`, `cls_dataset`) and `training_args` (short CPU runs);
  `sentences`, labelled toy text for the example-script tests (conftest.py trains their tokenizer on it).
* adapter helpers: `flex_config` (a small FlexLoRA config), `random_lambda`, `trained` (an adapter whose ranks have
  moved), `inputs` / `logits` (a fixed batch and the model's logits on it), `PNG_SIGNATURE`.
* `torchrun`: a script under ``torch.distributed.run`` with 2 CPU processes (gloo).
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, get_flexlora_model
from flexlora_hf.functional import plan_reallocation

VOCAB = 100  # the adapter tests' models (and `inputs`)
DATA_VOCAB = 64  # the token range of `lm_dataset` / `cls_dataset`, and the Trainer tests' models
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------- models
def tiny_llama(
    *, seed: int = 0, hidden: int = 32, layers: int = 2, vocab_size: int = VOCAB, eval_mode: bool = True, **config: Any
) -> LlamaForCausalLM:
    """A random Llama causal LM (4 heads, 2 KV heads, MLP 2 × hidden); `config` overrides any LlamaConfig field."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 64,
            **config,
        }
    )
    model = LlamaForCausalLM(cfg)
    return model.eval() if eval_mode else model


def tiny_bert(
    *,
    seed: int = 0,
    num_labels: int = 3,
    hidden: int = 32,
    vocab_size: int = VOCAB,
    dropout: float | None = None,
    eval_mode: bool = True,
    **config: Any,
) -> BertForSequenceClassification:
    """A random 2-layer BERT sequence classifier; `dropout` sets both dropout probabilities (None: the config's)."""
    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 2 * hidden,
        "vocab_size": vocab_size,
        "max_position_embeddings": 64,
        "num_labels": num_labels,
    }
    if dropout is not None:
        fields.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = BertForSequenceClassification(BertConfig(**{**fields, **config}))
    return model.eval() if eval_mode else model


def tiny_gpt2(*, seed: int = 0, eval_mode: bool = True, **config: Any) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 (Conv1D projections, hidden 32)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        **{
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": VOCAB,
            "n_positions": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            **config,
        }
    )
    model = GPT2LMHeadModel(cfg)
    return model.eval() if eval_mode else model


def trainer_llama(seed: int = 0) -> LlamaForCausalLM:
    """The Trainer tests' Llama: `DATA_VOCAB` tokens, in training mode."""
    return tiny_llama(seed=seed, vocab_size=DATA_VOCAB, eval_mode=False)


def trainer_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    """The Trainer tests' BERT classifier: `DATA_VOCAB` tokens, no dropout, in training mode."""
    return tiny_bert(seed=seed, num_labels=num_labels, vocab_size=DATA_VOCAB, dropout=0.0, eval_mode=False)


# ------------------------------------------------------------------------------------------------ Trainer data/args
def lm_dataset(
    n: int = 64, length: int = 12, seed: int = 0, vocab_size: int = DATA_VOCAB, max_start: int = 48
) -> Dataset:
    """`n` rows of `length` consecutive token ids (mod `vocab_size`) from a random start below `max_start`."""
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern (token i+1 follows token i) so the loss really moves.
    start = torch.randint(0, max_start, (n, 1), generator=g)
    ids = (start + torch.arange(length)) % vocab_size
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def cls_dataset(n: int = 64, length: int = 10, seed: int = 0, num_labels: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, DATA_VOCAB, (n, length), generator=g)
    labels = (ids[:, 0] % num_labels).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


def training_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        max_steps=24,
        learning_rate=5e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ---------------------------------------------------------------------------------------------------- adapters
def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed (2, 9) batch of token ids below `VOCAB`."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=g)}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def flex_config(**kw: Any) -> FlexLoRAConfig:
    """r=4, α=8, two moves per event every 10 steps over 100 steps, orthonormal basis; `kw` overrides any field."""
    base: dict[str, Any] = {
        "init_basis": "orthonormal",  # λ is each direction's size, which the mechanics tests set (random_lambda)
        "r": 4,
        "lora_alpha": 8.0,
        "b0": 2,
        "t_warmup": 10,
        "t_final": 10,
        "delta_t": 10,
        "total_steps": 100,
    }
    base.update(kw)
    return FlexLoRAConfig(**base)


@torch.no_grad()
def random_lambda(fm: FlexLoRAModel, seed: int = 0, scale: float = 1.0) -> None:
    """Gaussian λ (times `scale`) on every active direction, zero on the inactive ones."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in fm.flexlora_layers():
        values = torch.randn(layer.capacity, generator=g) * scale
        layer.lora_lam.copy_(values * layer.lora_active)


def trained(make: Callable[[], torch.nn.Module], events: int = 3, **kw: Any) -> FlexLoRAModel:
    """An adapter whose ranks have moved: random λ, then `events` planned reallocations (recorded in the history)."""
    fm = get_flexlora_model(make(), flex_config(**kw))
    for event in range(events):
        random_lambda(fm, seed=event)
        plan = plan_reallocation(
            fm.importance_scores(), fm.rank_map(), 2, max_rank=fm.rank_caps()
        )
        fm.apply_plan(plan, step=20 + 10 * event)
        fm.rank_history.append(
            {"step": 20 + 10 * event, "prune": list(plan.prune), "expand": list(plan.expand), "ranks": fm.rank_map()}
        )
    random_lambda(fm, seed=99)  # the new directions get a non-zero λ too
    with torch.no_grad():  # a trained head differs from the base model's random one
        for name, p in fm.get_base_model().named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return fm.eval()


# ---------------------------------------------------------------------------------------------------- examples
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Every file a saved adapter folder holds (both views, rank map and history, heatmap, card).
ADAPTER_FILES = (
    "flexlora_config.json",
    "flexlora_adapter.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "rank_map.json",
    "rank_history.json",
    "rank_heatmap.png",
    "README.md",
)


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"flexlora_examples_{name.replace('/', '_')}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# A C++ terminate with no Python traceback while gloo tears down; it failed CI once (test_fsdp2, after 180 s of
# passing tests) and did not repeat in 70 local reruns, idle or loaded. Not our code's failure, so one rerun.
TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(script: str | Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script args`` as 2 CPU processes under torchrun (gloo, one thread each); rerun once after a gloo
    teardown abort. Asserts success and returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# Labelled toy sentences for the example-script tests (their tokenizer is trained on them too).
POSITIVE = ["good", "great", "fine", "nice", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "nasty", "dreadful", "weak"]
NOUNS = ["film", "meal", "book", "song", "trip", "game", "show", "room"]


def sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((f"the {rng.choice(NOUNS)} was {word} and the {rng.choice(NOUNS)} was {rng.choice(NOUNS)}", label))
    return rows


def train_bpe_tokenizer(corpus: list[str], *, vocab_size: int, special: list[str], **tokens: Any) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` in about a second (never a Hub download).

    `special` lists the special tokens in vocabulary order; `tokens` are the tokenizer's keyword arguments (e.g.
    ``pad_token="[PAD]"``, ``model_max_length=128``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **tokens)
