"""Fixtures shared by the test modules. Where shared code lives in this test suite:

* `conftest.py` (this file): fixtures used by more than one test module; pytest provides them by name, nothing
  imports them. `local_hub` (defined in `hub_stub.py`, registered here): a running loopback `LocalHub` with
  `huggingface_hub`, `transformers` and PEFT pointed at it.
* `helpers.py`: plain functions, imported explicitly (``from helpers import tiny_llama, training_args``): the tiny
  random models built from configs (`tiny_llama`, `tiny_bert`, `tiny_gpt2`, one builder per architecture whose
  keyword arguments cover every variant the tests use; `trainer_llama` / `trainer_bert` for the Trainer tests),
  the synthetic datasets (`lm_dataset`, `cls_dataset`), `training_args`, and adapter helpers (`trained`, `logits`,
  ...). Builders are plain functions rather than fixtures because `ddp_train.py`, run as a script by torchrun, needs
  them too, and because tests pass them around as values (`parametrize("make", [tiny_llama, tiny_bert])`).
* `hub_stub.py` (the loopback Hub) and `reference_impl.py` (plain-Python reference formulas): plain helper modules.

No test module (``test_*.py``) imports another one. Markers (pyproject.toml): `slow`, deselected by default
(``pytest -m slow`` runs them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import transformers
from helpers import sentences, tiny_bert, tiny_llama, train_bpe_tokenizer
from hub_stub import local_hub_fixture  # noqa: F401 - registers the `local_hub` fixture for every test module


@pytest.fixture(autouse=True)
def _restore_logging():
    """Example scripts configure transformers' and flexlora_hf's logging globally; put it back after each test."""
    verbosity = transformers.utils.logging.get_verbosity()
    level = logging.getLogger("flexlora_hf").level
    yield
    transformers.utils.logging.set_verbosity(verbosity)
    logging.getLogger("flexlora_hf").setLevel(level)


# ---- the example-script tests' tiny models, saved as HF folders with a tokenizer trained on local text
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE tokenizer trained on local text (about a second), saved as an HF folder."""
    corpus = [text for text, _ in sentences(400)]
    corpus += Path(transformers.__file__).read_text(encoding="utf-8").splitlines()[:400]
    fast = train_bpe_tokenizer(
        corpus,
        vocab_size=300,
        special=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"],
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=128,
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_bert_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A random 2-layer BERT sequence classifier (hidden 32, 2 heads, 2 labels) with the tiny tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_bert(
        num_labels=2,
        vocab_size=len(tokenizer),
        eval_mode=False,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A random 2-layer Llama causal LM (hidden 32, GQA 4/2 heads) with the tiny tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        eval_mode=False,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
