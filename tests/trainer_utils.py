"""Shared builders for the Trainer tests: tiny random models from configs and synthetic token data."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, TrainingArguments


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(cfg)


def lm_dataset(n: int = 64, length: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern (token i+1 follows token i) so the loss really moves.
    start = torch.randint(0, 48, (n, 1), generator=g)
    ids = (start + torch.arange(length)) % 64
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def cls_dataset(n: int = 64, length: int = 10, seed: int = 0, num_labels: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    labels = (ids[:, 0] % num_labels).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


def training_args(output_dir: str, **overrides) -> TrainingArguments:
    kwargs = dict(
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
