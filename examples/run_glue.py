#!/usr/bin/env python
"""Fine-tune a sequence-classification model with entropy-guided FlexLoRA on GLUE, BIG-bench or local files.

This script owns the text-classification example. It follows transformers' ``examples/pytorch/text-classification/
run_glue.py`` (``ModelArguments`` / ``DataTrainingArguments`` + ``TrainingArguments`` through ``HfArgumentParser``,
or one ``.json`` file holding all of them). The lines that add FlexLoRA are marked ``# FlexLoRA:``; apply the same
few lines to your own copy of a transformers example. Lines marked ``# flexlora_hf extra:`` add things that are not
needed for FlexLoRA itself (offline BIG-bench data, the metric modules loaded from ``examples/metrics`` rather than
the Hub).

Data, one of:
  * ``--task_name cola`` (any GLUE task) -- ``datasets.load_dataset("nyu-mll/glue", task)``, needs the Hub;
  * ``--bigbench_task multiemo --bigbench_subtask all_sentence_en`` (or ``epistemic_reasoning``, ...) -- real
    data offline, from the BIG-bench source archive on PyPI;
  * ``--dataset_name ... [--dataset_config_name ...]`` -- any Hub dataset with a ``label`` column;
  * ``--train_file train.csv --validation_file dev.csv`` -- local csv/json files with a ``label`` column and one or
    two text columns (``sentence1``/``sentence2``, else the first one or two non-label columns).

Example (offline, real model and data)::

    python examples/run_glue.py --model_name_or_path "$(python -m flexlora_hf.data.assets minilm)" \\
        --bigbench_task multiemo --bigbench_subtask all_sentence_en --bigbench_max_examples 3000 \\
        --do_train --do_eval --max_seq_length 64 --per_device_train_batch_size 16 --learning_rate 2e-3 \\
        --num_train_epochs 1 --warmup_steps 0.1 --modules_to_save classifier,pooler \\
        --target_modules query,key,value,attention.output.dense,intermediate.dense,output.dense \\
        --t_warmup 30 --t_final 30 --delta_t 7 --output_dir outputs/glue_minilm

Metrics are computed by ``evaluate`` as in the transformers example (``glue`` for a GLUE task, ``accuracy``, ``mse``),
from the local modules in ``examples/metrics``. ``--push_to_hub`` uploads the adapter folder (native and PEFT views)
with its FlexLoRA card; without it the card is written to ``--output_dir``.

The paper's GLUE recipes (DeBERTaV3-base, Table 8) are in ``examples/glue_recipes/``.
"""

from __future__ import annotations

# isort: off
import flexlora_hf  # noqa: F401  -- first: mutes bitsandbytes' import-time kernels lookup (flexlora_hf/_logging.py)
# isort: on

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import evaluate
import numpy as np
import transformers
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from flexlora_hf import (  # FlexLoRA: --r, --b0, ... flags; the Trainer that reallocates
    FlexLoRAArguments,
    FlexLoRATrainer,
)
from flexlora_hf.data.metrics import normalize_glue_task  # flexlora_hf extra: GLUE task aliases (sst-2, mnli-m)

logger = logging.getLogger(__name__)

# flexlora_hf extra: local copies of the Hub's metric modules, loaded by path (a Hub name downloads their code)
METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


@dataclass
class DataTrainingArguments:
    """Arguments for the data used for training and evaluation."""

    task_name: str | None = field(
        default=None,
        metadata={"help": "GLUE task, loaded from the Hub (nyu-mll/glue): " + ", ".join(task_to_keys)},
    )
    bigbench_task: str | None = field(
        default=None,
        metadata={
            "help": "BIG-bench classification task loaded offline from the BIG-bench archive on PyPI, e.g. "
            "multiemo (with --bigbench_subtask all_sentence_en), epistemic_reasoning, vitaminc_fact_verification."
        },
    )
    bigbench_subtask: str | None = field(
        default=None,
        metadata={"help": "Subtask folder of a BIG-bench task split into subtasks (multiemo/all_sentence_en)."},
    )
    bigbench_max_examples: int | None = field(
        default=None, metadata={"help": "Seeded subsample of the BIG-bench task before the train/validation split."}
    )
    bigbench_validation_fraction: float = field(
        default=0.2, metadata={"help": "Share of the BIG-bench rows held out as the validation split."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Name of a dataset on the Hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Maximum total input length after tokenization; longer inputs are truncated."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every sample to max_seq_length (default: pad each batch to its longest sample)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many examples (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set to this many examples."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Truncate the prediction set to this many examples."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A csv or json file with the training data."})
    validation_file: str | None = field(default=None, metadata={"help": "A csv or json file with validation data."})
    test_file: str | None = field(default=None, metadata={"help": "A csv or json file with test data."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self) -> None:
        self.task_name = normalize_glue_task(self.task_name)
        if self.task_name is not None and self.task_name not in task_to_keys:
            raise ValueError(f"Unknown GLUE task {self.task_name!r}; choose one of {', '.join(task_to_keys)}.")
        sources = [
            self.task_name is not None,
            self.bigbench_task is not None,
            self.dataset_name is not None,
            self.train_file is not None or self.validation_file is not None,
        ]
        if sum(sources) == 0:
            raise ValueError("Need --task_name, --bigbench_task, --dataset_name or --train_file/--validation_file.")
        if sum(sources) > 1 and not (self.task_name is not None and self.bigbench_task is None and sum(sources) == 2):
            # --task_name may be combined with local files (GLUE metrics on your own copy of the data).
            raise ValueError("Give only one data source: --task_name, --bigbench_task, --dataset_name or files.")
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl"):
                raise ValueError(f"--{name} must be a csv or json file, got {path}.")


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
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a checkpoint whose classification head has another number of labels."}
    )


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


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> datasets.DatasetDict:
    """Load the raw splits from BIG-bench, the GLUE Hub dataset, another Hub dataset or local files."""
    if data_args.bigbench_task is not None:  # flexlora_hf extra: real data without the Hub
        from flexlora_hf.data.bigbench import load_bigbench_classification

        return load_bigbench_classification(
            data_args.bigbench_task,
            validation_fraction=data_args.bigbench_validation_fraction,
            seed=seed,
            max_examples=data_args.bigbench_max_examples,
            subtask=data_args.bigbench_subtask,
        )
    if data_args.train_file is not None or data_args.validation_file is not None:
        data_files = {}
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        ):
            if path is not None:
                data_files[split] = path
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        builder = "csv" if extension == "csv" else "json"
        return load_dataset(builder, data_files=data_files, cache_dir=model_args.cache_dir)
    name, config = (
        ("nyu-mll/glue", data_args.task_name)
        if data_args.task_name is not None
        else (data_args.dataset_name, data_args.dataset_config_name)
    )
    try:
        return load_dataset(name, config, cache_dir=model_args.cache_dir, token=model_args.token)
    except Exception as err:  # offline, or a typo in the dataset name
        raise RuntimeError(
            f"Could not load the dataset {name!r} ({config}) from the Hub: {err}. Without Hub access use "
            "--bigbench_task <task> (offline real data) or --train_file/--validation_file."
        ) from err


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
    """Run the example; returns the final evaluation metrics (empty without ``--do_eval``)."""
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
    raw_datasets = load_raw_datasets(data_args, model_args, training_args.seed)

    # Labels
    task_name = data_args.task_name
    is_regression = task_name == "stsb"
    label_feature = raw_datasets["train" if "train" in raw_datasets else "validation"].features["label"]
    label_list: list | None = None
    if task_name is None:
        is_regression = label_feature.dtype in ("float32", "float64")
    if is_regression:
        num_labels = 1
    elif isinstance(label_feature, ClassLabel):
        label_list = list(label_feature.names)
        num_labels = len(label_list)
    else:
        label_list = sorted(raw_datasets["train" if "train" in raw_datasets else "validation"].unique("label"))
        num_labels = len(label_list)

    # Model and tokenizer
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=task_name or data_args.bigbench_subtask or data_args.bigbench_task,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if is_regression:
        config.problem_type = "regression"
    else:
        config.problem_type = "single_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    # Text columns
    if task_name is not None:
        sentence1_key, sentence2_key = task_to_keys[task_name]
    else:
        columns = [c for c in raw_datasets["train" if "train" in raw_datasets else "validation"].column_names]
        non_label = [c for c in columns if c != "label"]
        if "sentence1" in non_label and "sentence2" in non_label:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        elif len(non_label) >= 2:
            sentence1_key, sentence2_key = non_label[:2]
        else:
            sentence1_key, sentence2_key = non_label[0], None

    label_to_id = None
    if label_list is not None:
        names = [str(label) for label in label_list]
        model.config.label2id = {name: i for i, name in enumerate(names)}
        model.config.id2label = dict(enumerate(names))
        if not isinstance(label_feature, ClassLabel):
            label_to_id = {label: i for i, label in enumerate(label_list)}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"max_seq_length={data_args.max_seq_length} is larger than the model's maximum "
            f"({tokenizer.model_max_length}); using {tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess_function(examples: dict) -> dict:
        texts = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            result["label"] = [label_to_id.get(label, -1) for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        if "train" not in raw_datasets:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = raw_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        eval_split = "validation_matched" if task_name == "mnli" else "validation"
        if eval_split not in raw_datasets:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = raw_datasets[eval_split]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
    if training_args.do_predict:
        test_split = "test_matched" if task_name == "mnli" else "test"
        if test_split not in raw_datasets:
            raise ValueError("--do_predict requires a test dataset")
        predict_dataset = raw_datasets[test_split]
        if data_args.max_predict_samples is not None:
            predict_dataset = predict_dataset.select(range(min(len(predict_dataset), data_args.max_predict_samples)))

    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        pad_to = 8 if (training_args.fp16 or training_args.bf16) else None
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)

    # Metrics, as the transformers example computes them (glue / mse / accuracy) from the local modules. flexlora_hf
    # extra: macro-F1 next to accuracy, and Pearson / Spearman next to MSE, for tasks that are not GLUE.
    def load_metric(name: str, config_name: str | None = None) -> evaluate.EvaluationModule:
        return evaluate.load(os.path.join(METRICS_DIR, name), config_name, cache_dir=model_args.cache_dir)

    extra_metrics: list[tuple[str, evaluate.EvaluationModule, dict]] = []
    if task_name is not None:
        metric = load_metric("glue", task_name)
    elif is_regression:
        metric = load_metric("glue", "stsb")  # Pearson and Spearman correlations
        extra_metrics.append(("mse", load_metric("mse"), {}))
    else:
        metric = load_metric("accuracy")
        extra_metrics.append(("macro_f1", load_metric("f1"), {"average": "macro"}))

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.atleast_1d(np.squeeze(preds)) if is_regression else np.argmax(preds, axis=1)
        result = metric.compute(predictions=preds, references=p.label_ids)
        if len(result) > 1:
            result["combined_score"] = np.mean(list(result.values())).item()
        for key, module, kwargs in extra_metrics:
            result[key] = next(iter(module.compute(predictions=preds, references=p.label_ids, **kwargs).values()))
        return result

    flexlora_config = flexlora_args.to_flexlora_config(seed=training_args.seed)  # FlexLoRA: build the config
    trainer = FlexLoRATrainer(  # FlexLoRA: was Trainer
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        flexlora_config=flexlora_config,  # FlexLoRA: adapter shape and reallocation schedule
    )

    if training_args.do_train:
        assert train_dataset is not None
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # FlexLoRA: writes the adapter folder (native + PEFT view, rank map, heatmap, card)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        logger.info(  # FlexLoRA: the final rank allocation
            "Final FlexLoRA rank map: %s",
            summarize_rank_map(trainer.flexlora_model.rank_map(), flexlora_config.r),
        )

    eval_metrics: dict[str, float] = {}
    if training_args.do_eval:
        assert eval_dataset is not None
        logger.info("*** Evaluate ***")
        tasks, eval_datasets = [task_name or "eval"], [eval_dataset]
        if task_name == "mnli":
            mismatched = raw_datasets["validation_mismatched"]
            if data_args.max_eval_samples is not None:
                mismatched = mismatched.select(range(min(len(mismatched), data_args.max_eval_samples)))
            tasks.append("mnli-mm")
            eval_datasets.append(mismatched)
        for name, dataset in zip(tasks, eval_datasets, strict=True):
            metrics = trainer.evaluate(eval_dataset=dataset)
            metrics["eval_samples"] = len(dataset)
            suffix = "_mm" if name == "mnli-mm" else ""
            trainer.log_metrics("eval" + suffix, metrics)
            trainer.save_metrics("eval" + suffix, metrics)
            eval_metrics.update({k + suffix: v for k, v in metrics.items()})

    if training_args.do_predict:
        assert predict_dataset is not None
        logger.info("*** Predict ***")
        predict_dataset = (
            predict_dataset.remove_columns("label") if "label" in predict_dataset.column_names else predict_dataset
        )
        predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
        output_file = os.path.join(training_args.output_dir, f"predict_results_{task_name or 'test'}.txt")
        if trainer.is_world_process_zero():
            with open(output_file, "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    value = f"{item:.3f}" if is_regression else (label_list[item] if label_list else item)
                    writer.write(f"{index}\t{value}\n")
            logger.info(f"Predictions written to {output_file}")

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"

    # FlexLoRA: both write the FlexLoRA card (rank map, heatmap, base_model); push_to_hub uploads the adapter folder
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)

    return eval_metrics


if __name__ == "__main__":
    main()
