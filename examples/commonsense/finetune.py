#!/usr/bin/env python
"""Fine-tune a causal LM with entropy-guided FlexLoRA on commonsense reasoning (the paper's Table 2 setting).

Data: the LLM-Adapters `commonsense_170k.json` format, a JSON list of `{"instruction", "input", "output", "answer"}`
rows (LLM-Adapters' `ft-training_set/commonsense_170k.json`, or a small local file from `make_data.py`). Every row is
rendered with LLM-Adapters' Alpaca-style training prompt (`flexlora_hf.integrations.tasks.utils.llm_adapters_train_prompt`),
truncated to `--cutoff_len` tokens, EOS appended; the loss is masked on the prompt (`--train_on_inputs` to train on
it as LLM-Adapters' default does). `--val_set_size` rows are held out (seed 42) for the Trainer's evaluation.

Model: `--load_in_4bit` loads the base in 4-bit NF4 with double quantisation (QLoRA) via
`flexlora_hf.adapter.quantization.load_base_model` (PEFT's `prepare_model_for_kbit_training` plus the bitsandbytes CPU
guard); otherwise bf16 on GPU / fp32 on CPU. `FlexLoRATrainer` wraps it with FlexLoRA adapters and performs the rank
reallocation events; the adapter (native FlexLoRA files + a stock PEFT LoRA view) is saved to `--output_dir`
together with the rank history and heatmap.

Baseline: `--baseline lora` trains a plain PEFT LoRA instead, at equal budget: `peft.LoraConfig` with the same
`--r`, `--lora_alpha`, `--lora_dropout`, `--target_modules` and `--modules_to_save` (FlexLoRA conserves the total
rank, so the same r on the same matrices is the same final budget), on the same base (4-bit included), data and
`TrainingArguments`, with `transformers.Trainer`. The FlexLoRA-only flags (`--b0`, `--t_warmup`, ...) are ignored.
The output folder is a stock PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`), which
`flexlora-hf eval --adapter` also scores.

Evaluate afterwards with lm-eval, e.g. the LLM-Adapters protocol of Table 2:

    FLEXLORA_HF_LLM_ADAPTERS_DATA=/path/to/LLM-Adapters/dataset \\
        flexlora-hf eval --base meta-llama/Meta-Llama-3-8B --adapter OUT --tasks flexlora_llm_adapters

All arguments: `python finetune.py --help` (model and data arguments below, the shared `FlexLoRAArguments` of
flexlora_hf (one flag per `FlexLoRAConfig` field: `--r`, `--target_modules q_proj,v_proj`, `--b0`, ...), plus every
`transformers.TrainingArguments` flag). A single `.json` file with all arguments also works:
`python finetune.py args.json`.
"""

from __future__ import annotations

# isort: off
import flexlora_hf  # noqa: F401  -- first: mutes bitsandbytes' import-time kernels lookup (flexlora_hf/_logging.py)
# isort: on

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from flexlora_hf import FlexLoRAArguments, FlexLoRAConfig, FlexLoRATrainer, load_base_model
from flexlora_hf.integrations.tasks.utils import llm_adapters_train_prompt

logger = logging.getLogger("finetune")

BASELINES = ("none", "lora")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base model id or folder (e.g. meta-llama/Meta-Llama-3-8B)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4-bit NF4 (QLoRA, bitsandbytes)."})
    compute_dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    baseline: str = field(
        default="none",
        metadata={
            "help": "none: train FlexLoRA (FlexLoRATrainer). lora: train a plain PEFT LoRA with the same r, "
            "lora_alpha, lora_dropout and target_modules (equal budget) with transformers.Trainer, saved as a PEFT "
            "adapter folder.",
            "choices": list(BASELINES),
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={"help": "commonsense_170k-format JSON: list of {instruction,input,output,answer}."}
    )
    val_set_size: int = field(default=120, metadata={"help": "Rows held out for evaluation (0: none)."})
    cutoff_len: int = field(default=256, metadata={"help": "Maximum tokens per example (LLM-Adapters: 256)."})
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also train on the prompt tokens (LLM-Adapters' default); masked if False."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


def load_rows(path: str) -> list[dict[str, str]]:
    """Read a commonsense_170k-format file (a JSON list; JSON lines also accepted)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    for i, row in enumerate(rows):
        missing = {"instruction", "output"} - set(row)
        if missing:
            raise ValueError(f"{path}: row {i} lacks {sorted(missing)}; expected instruction/input/output/answer.")
    return rows


def tokenize_row(row: dict[str, str], tokenizer: Any, cutoff_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    """LLM-Adapters' tokenisation: full prompt + EOS (when it fits), labels = ids with the prompt masked."""
    full = llm_adapters_train_prompt(row["instruction"], row.get("input") or "", row["output"])
    ids = tokenizer(full, truncation=True, max_length=cutoff_len)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids = [*ids, tokenizer.eos_token_id]
    labels = list(ids)
    if not train_on_inputs:
        prompt = llm_adapters_train_prompt(row["instruction"], row.get("input") or "", "")
        n_prompt = len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"])
        labels = [-100] * n_prompt + labels[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_datasets(data_args: DataArguments, tokenizer: Any) -> tuple[Any, Any]:
    from datasets import Dataset

    rows = load_rows(data_args.data_path)
    dataset = Dataset.from_list(
        [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]
    )
    eval_dataset = None
    if data_args.val_set_size > 0:
        split = dataset.train_test_split(test_size=data_args.val_set_size, shuffle=True, seed=42)
        dataset, eval_dataset = split["train"], split["test"]
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))

    def tok(row: dict[str, str]) -> dict[str, list[int]]:
        return tokenize_row(row, tokenizer, data_args.cutoff_len, data_args.train_on_inputs)

    columns = dataset.column_names
    dataset = dataset.map(tok, remove_columns=columns, desc="Tokenizing train")
    if eval_dataset is not None:
        eval_dataset = eval_dataset.map(tok, remove_columns=columns, desc="Tokenizing eval")
    return dataset, eval_dataset


def build_lora_trainer(
    model: Any,
    flexlora_config: FlexLoRAConfig,
    training_args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    tokenizer: Any,
    data_collator: Any,
) -> Trainer:
    """The `--baseline lora` trainer: a PEFT LoRA at FlexLoRA's budget on `model`, trained by `transformers.Trainer`.

    Args:
        model (`PreTrainedModel`): the frozen base from `load_base_model` (for a 4-bit base already prepared with
            PEFT's `prepare_model_for_kbit_training`, as QLoRA users do).
        flexlora_config (`FlexLoRAConfig`): the parsed FlexLoRA flags; `r`, `lora_alpha`, `lora_dropout`,
            `target_modules` and `modules_to_save` are copied to `peft.LoraConfig` (same matching rules: names match
            as suffixes, a string is a full-match regex, `None` is every linear layer but the output head).
        training_args (`TrainingArguments`), train_dataset, eval_dataset, tokenizer, data_collator: as for
            `FlexLoRATrainer`.

    Returns:
        `transformers.Trainer`: over the `PeftModel`; `save_model` writes a stock PEFT adapter folder.
    """
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=flexlora_config.r,
        lora_alpha=flexlora_config.lora_alpha,
        lora_dropout=flexlora_config.lora_dropout,
        target_modules=flexlora_config.target_modules or "all-linear",
        modules_to_save=flexlora_config.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    if training_args.should_log:
        trainable, total = peft_model.get_nb_trainable_parameters()
        logger.info(
            "PEFT LoRA baseline: r=%d, alpha=%g on %d matrices; %d trainable parameters of %d",
            lora_config.r,
            lora_config.lora_alpha,
            sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A.default")),
            trainable,
            total,
        )
    return Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, FlexLoRAArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, FlexLoRAArguments, TrainingArguments))  # type: ignore[arg-type]
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))  # type: ignore[return-value]
    return parser.parse_args_into_dataclasses(argv)  # type: ignore[return-value]


def main(argv: list[str] | None = None, callbacks: list[transformers.TrainerCallback] | None = None) -> str:
    """Run fine-tuning; returns the folder the adapter was saved to. `callbacks` are added to the Trainer (either
    method), e.g. the diagnostic of `benchmarks/motion.py`."""
    model_args, data_args, flex_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    logger.info("Model %s | data %s | FlexLoRA %s", model_args, data_args, flex_args)

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # padded labels are -100 either way
    tokenizer.padding_side = "right"
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset, eval_dataset = build_datasets(data_args, tokenizer)
    logger.info("%d training rows, %d eval rows", len(train_dataset), len(eval_dataset) if eval_dataset else 0)

    set_seed(training_args.seed)  # before the model and adapter are built (PEFT's LoRA init draws from torch's RNG)
    compute_dtype = None if model_args.compute_dtype == "auto" else getattr(torch, model_args.compute_dtype)
    load_kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_base_model(
        model_args.model_name_or_path,
        load_in_4bit=model_args.load_in_4bit,
        compute_dtype=compute_dtype,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        **load_kwargs,
    )
    training_args.gradient_checkpointing = False  # load_base_model has set it up (non-reentrant, input grads)
    if training_args.label_names is None:
        training_args.label_names = ["labels"]  # FlexLoRAModel's / PeftModel's signature hides `labels`
    if eval_dataset is None and training_args.eval_strategy != "no":
        training_args.eval_strategy = transformers.IntervalStrategy.NO

    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    flexlora_config = flex_args.to_flexlora_config(seed=training_args.seed)
    if model_args.baseline == "lora":
        trainer = build_lora_trainer(
            model, flexlora_config, training_args, train_dataset, eval_dataset, tokenizer, collator
        )
    else:
        trainer = FlexLoRATrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=collator,
            flexlora_config=flexlora_config,
        )
        if trainer.is_world_process_zero():
            trainer.flexlora_model.print_trainable_parameters()
    for callback in callbacks or []:
        trainer.add_callback(callback)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # FlexLoRA: adapter + PEFT LoRA view; LoRA: PEFT folder; + tokenizer
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if model_args.baseline == "lora":
        logger.info("PEFT LoRA adapter saved to %s", training_args.output_dir)
    else:
        logger.info(
            "Adapter saved to %s (final ranks: total %d)",
            training_args.output_dir,
            trainer.flexlora_model.total_rank(),
        )
    return str(training_args.output_dir)


if __name__ == "__main__":
    main()
