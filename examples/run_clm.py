#!/usr/bin/env python
"""Fine-tune a causal language model with entropy-guided FlexLoRA on a text dataset; report perplexity.

This script owns the causal-LM example. It follows transformers' ``examples/pytorch/language-modeling/run_clm.py``
(``ModelArguments`` / ``DataTrainingArguments`` + ``TrainingArguments`` through ``HfArgumentParser``, or one
``.json`` file holding all of them): texts are tokenized, concatenated and cut into ``--block_size`` blocks, and
the evaluation loss is reported as perplexity, next to the next-token accuracy computed by ``evaluate``. The lines
that add FlexLoRA are marked ``# FlexLoRA:``; apply the same few lines to your own copy of a transformers example.
Lines marked ``# flexlora_hf extra:`` are not needed for FlexLoRA itself (the metric module is loaded from
``examples/metrics`` rather than the Hub). ``--push_to_hub`` uploads the adapter folder with its FlexLoRA card;
without it the card is written to ``--output_dir``.

Data, one of:
  * ``--dataset_name ... [--dataset_config_name ...]`` -- a Hub dataset with a text column (needs the Hub);
  * ``--train_file train.txt [--validation_file valid.txt]`` -- local ``.txt`` (one document per line), or
    ``.json``/``.jsonl``/``.csv`` with a ``--text_column`` (default ``text``). Without a validation file,
    ``--validation_split_percentage`` of the training data is held out.

Example (offline, real model; SmolLM2-135M is a Llama model, the paper adapts Q, K, V, Up and Down)::

    python examples/run_clm.py --model_name_or_path "$(python -m flexlora_hf.data.assets smollm2)" \\
        --train_file my_corpus.txt --block_size 128 --do_train --do_eval \\
        --per_device_train_batch_size 8 --learning_rate 3e-4 --max_steps 40 \\
        --target_modules q_proj,k_proj,v_proj,up_proj,down_proj --lora_dropout 0.05 \\
        --t_warmup 8 --t_final 8 --delta_t 4 --output_dir outputs/clm_smollm2
"""

from __future__ import annotations

# isort: off
import flexlora_hf  # noqa: F401  -- first: mutes bitsandbytes' import-time kernels lookup (flexlora_hf/_logging.py)
# isort: on

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
import evaluate
import torch
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from flexlora_hf import (  # FlexLoRA: --r, --b0, ... flags; the Trainer that reallocates
    FlexLoRAArguments,
    FlexLoRATrainer,
)

logger = logging.getLogger(__name__)

# flexlora_hf extra: local copies of the Hub's metric modules, loaded by path (a Hub name downloads their code)
METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")


@dataclass
class ModelArguments:
    """Arguments for the model, config and tokenizer to fine-tune from."""

    model_name_or_path: str = field(metadata={"help": "Local folder or Hub model id of the pretrained model."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit id)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the model in this dtype ('auto' uses the checkpoint's).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )


@dataclass
class DataTrainingArguments:
    """Arguments for the data used for training and evaluation."""

    dataset_name: str | None = field(default=None, metadata={"help": "Name of a dataset on the Hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a txt, json, jsonl or csv file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data (same formats)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in json/csv/Hub data."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many blocks (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set to this many blocks."}
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Length of the training blocks after tokenization. Default: the model maximum, at most 1024."
        },
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Need --dataset_name or --train_file/--validation_file.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("txt", "json", "jsonl", "csv"):
                raise ValueError(f"--{name} must be a txt, json, jsonl or csv file, got {path}.")


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments, object]:
    """Parse the command line, or a single ``.json`` file holding every argument."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, FlexLoRAArguments)  # FlexLoRA: + FlexLoRAArguments
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))  # type: ignore[return-value]
    return parser.parse_args_into_dataclasses(args=argv)  # type: ignore[return-value]


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    """Load train/validation splits from the Hub or local files, holding out a validation share if needed."""
    pct = data_args.validation_split_percentage
    if data_args.dataset_name is not None:
        name, config, kwargs = data_args.dataset_name, data_args.dataset_config_name, {}
    else:
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        name = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        config, kwargs = None, {"data_files": data_files}
        if name == "text":
            kwargs["keep_linebreaks"] = data_args.keep_linebreaks
    common = dict(cache_dir=model_args.cache_dir, token=model_args.token, **kwargs)
    raw = load_dataset(name, config, **common)
    if "validation" not in raw and "train" in raw:
        raw["validation"] = load_dataset(name, config, split=f"train[:{pct}%]", **common)
        raw["train"] = load_dataset(name, config, split=f"train[{pct}%:]", **common)
    return raw


def summarize_rank_map(rank_map: dict[str, int], initial_rank: int) -> str:
    """One line per changed module (``path: r0 -> r``) after a header with the totals."""
    changed = {name: rank for name, rank in rank_map.items() if rank != initial_rank}
    lines = [
        f"total rank {sum(rank_map.values())} over {len(rank_map)} matrices (initial {initial_rank} each); "
        f"{len(changed)} changed, min {min(rank_map.values(), default=0)}, max {max(rank_map.values(), default=0)}"
    ]
    lines += [f"  {name}: {initial_rank} -> {rank}" for name, rank in changed.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the final evaluation metrics, with ``perplexity`` (empty without ``--do_eval``)."""
    model_args, data_args, training_args, flexlora_args = parse_args(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logging.getLogger("flexlora_hf").setLevel(logging.INFO)  # FlexLoRA: show each reallocation event
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    set_seed(training_args.seed)
    raw_datasets = load_raw_datasets(data_args, model_args)

    hub_kwargs = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub_kwargs)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, config=config, dtype=dtype, **hub_kwargs
    )

    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))

    # Tokenize every text, then concatenate and cut into blocks.
    split = "train" if training_args.do_train else "validation"
    column_names = list(raw_datasets[split].features)
    text_column = data_args.text_column if data_args.text_column in column_names else column_names[0]

    def tokenize_function(examples: dict) -> dict:
        return tokenizer(examples[text_column])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw_datasets.map(
            tokenize_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    max_pos = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    model_max = min(tokenizer.model_max_length, max_pos)
    if data_args.block_size is None:
        block_size = min(1024, model_max)
    else:
        if data_args.block_size > model_max:
            logger.warning(f"block_size={data_args.block_size} exceeds the model maximum ({model_max}); using it.")
        block_size = min(data_args.block_size, model_max)

    def group_texts(examples: dict) -> dict:
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[next(iter(examples))])
        total_length = (total_length // block_size) * block_size  # drop the remainder
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = [ids.copy() for ids in result["input_ids"]]
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized.map(
            group_texts,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Grouping texts in chunks of {block_size}",
        )

    train_dataset = eval_dataset = None
    if training_args.do_train:
        if "train" not in lm_datasets:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = lm_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
        if len(train_dataset) == 0:
            raise ValueError(f"The training data is shorter than one block of {block_size} tokens; lower --block_size.")
    if training_args.do_eval:
        if "validation" not in lm_datasets:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = lm_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
        if len(eval_dataset) == 0:
            raise ValueError(f"The validation data is shorter than one block of {block_size} tokens.")

    compute_metrics = preprocess_logits_for_metrics = None
    if training_args.do_eval:

        def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if isinstance(logits, tuple):
                logits = logits[0]  # extra outputs (past key values) are not needed
            return logits.argmax(dim=-1)

        # flexlora_hf extra: the local accuracy module (the transformers example loads "accuracy" from the Hub)
        metric = evaluate.load(os.path.join(METRICS_DIR, "accuracy"), cache_dir=model_args.cache_dir)

        def compute_metrics(eval_preds: tuple) -> dict[str, float]:
            preds, labels = eval_preds
            # the prediction at position i is for token i + 1 (the model shifts the labels inside)
            labels = labels[:, 1:].reshape(-1)
            preds = preds[:, :-1].reshape(-1)
            return metric.compute(predictions=preds, references=labels)

    flexlora_config = flexlora_args.to_flexlora_config(seed=training_args.seed)  # FlexLoRA: build the config
    trainer = FlexLoRATrainer(  # FlexLoRA: was Trainer
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        flexlora_config=flexlora_config,  # FlexLoRA: adapter shape and reallocation schedule
    )

    if training_args.do_train:
        assert train_dataset is not None
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # FlexLoRA: writes the adapter folder (native + PEFT view, rank map, heatmap, card)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        logger.info(  # FlexLoRA: the final rank allocation
            "Final FlexLoRA rank map: %s",
            summarize_rank_map(trainer.flexlora_model.rank_map(), flexlora_config.r),
        )

    metrics = {}
    if training_args.do_eval:
        assert eval_dataset is not None
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name

    # FlexLoRA: both write the FlexLoRA card (rank map, heatmap, base_model); push_to_hub uploads the adapter folder
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return metrics


if __name__ == "__main__":
    main()
