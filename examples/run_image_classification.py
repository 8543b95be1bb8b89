#!/usr/bin/env python
"""Fine-tune a ViT image classifier with entropy-guided FlexLoRA (the paper's ViT / VTAB-1k setting).

This script owns the image-classification example. It follows transformers' ``examples/pytorch/image-classification/
run_image_classification.py`` (``ModelArguments`` / ``DataTrainingArguments`` + ``TrainingArguments`` through
``HfArgumentParser``, or one ``.json`` file holding all of them). The lines that add FlexLoRA are marked
``# FlexLoRA:``; apply the same few lines to your own copy of the transformers example. Lines marked
``# flexlora_hf extra:`` are conveniences that FlexLoRA does not need (VTAB-1k folders, the offline metric module).

Differences from the transformers example, and why:

* no torchvision: images go through the model's own image processor (resize, rescale, normalise; transformers uses
  its PIL backend when torchvision is missing). There is no random augmentation, which is also the VTAB-1k
  protocol of the parameter-efficient fine-tuning literature (resize to the model's input size, normalise);
* accuracy is computed by ``evaluate`` as in the transformers example, from the local module
  ``examples/metrics/accuracy`` (``evaluate.load("accuracy")`` downloads the module's code from the Hub);
* ``remove_unused_columns`` is switched off (the transform needs the raw image column; the transformers example
  asks you to pass ``--remove_unused_columns False``).

Adapted matrices: by default the paper's ViT targets, the query / key / value projections, the attention output
and the MLP's two layers of every block, under the names the installed transformers gives them: ``query, key,
value, attention.output.dense, intermediate.dense, output.dense`` in the classic ViT modules, ``q_proj, k_proj,
v_proj, o_proj, fc1, fc2`` in the refactored ones (transformers 5.24 here). ``--target_modules`` overrides it. The
classification head is trained in full (``--modules_to_save classifier``, also the default for
``*ForImageClassification``).

Data, one of:
  * ``--vtab1k_dir data/vtab-1k/<task>`` -- a VTAB-1k task folder as distributed by the PEFT literature (image
    files plus ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``, one ``<image path> <label>``
    per line); ``--vtab1k_protocol final`` trains on the 1,000 images and evaluates on the test list, ``tuning`` on
    800 / 200. See ``examples/vtab/README.md`` for the 19 tasks and where to get them;
  * ``--train_dir train/ [--validation_dir val/]`` -- image folders with one sub-folder per class (the
    ``imagefolder`` builder of datasets);
  * ``--dataset_name ... [--dataset_config_name ...]`` -- a Hub dataset with an image and a label column.

Example (the paper's VTAB-1k settings: ``bash examples/vtab/run_vtab1k.sh cifar``)::

    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --vtab1k_dir data/vtab-1k/cifar --do_train --do_eval --learning_rate 2e-3 --weight_decay 1e-3 \\
        --per_device_train_batch_size 64 --num_train_epochs 100 --r 8 --lora_alpha 16 --b0 4 \\
        --t_warmup 320 --t_final 320 --delta_t 80 --output_dir outputs/vtab1k/cifar
"""

from __future__ import annotations

# isort: off
import flexlora_hf  # noqa: F401  -- first: mutes bitsandbytes' import-time kernels lookup (flexlora_hf/_logging.py)
# isort: on

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from flexlora_hf import (  # FlexLoRA: --r, --b0, ... flags; the Trainer that reallocates
    FlexLoRAArguments,
    FlexLoRATrainer,
)

logger = logging.getLogger(__name__)

# flexlora_hf extra: local copies of the Hub's metric modules, loaded by path (a Hub name downloads their code)
METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")

# The paper's ViT targets (Q, K, V, attention output, MLP in, MLP out), under both module namings of transformers.
VIT_TARGETS_CLASSIC = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
VIT_TARGETS_REFACTORED = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]

# The 19 VTAB-1k tasks (folder names of the usual vtab-1k distribution) and their number of classes.
VTAB1K_NUM_CLASSES = {
    # natural
    "caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397,
    # specialized
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    # structured
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip
VTAB1K_SPLITS = {"final": ("train800val200.txt", "test.txt"), "tuning": ("train800.txt", "val200.txt")}


@dataclass
class DataTrainingArguments:
    """Arguments for the data used for training and evaluation."""

    dataset_name: str | None = field(default=None, metadata={"help": "Name of a dataset on the Hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder with one sub-folder of images per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, same layout."})
    vtab1k_dir: str | None = field(
        default=None,
        metadata={
            "help": "A VTAB-1k task folder (images + train800.txt / val200.txt / train800val200.txt / test.txt), "
            "e.g. data/vtab-1k/cifar. See examples/vtab/README.md."
        },
    )
    vtab1k_protocol: str = field(
        default="final",
        metadata={"help": "final: train on train800val200, evaluate on test; tuning: train800 / val200."},
    )
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Share of train held out for validation when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many examples (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set to this many examples."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})

    def __post_init__(self) -> None:
        sources = [self.dataset_name is not None, self.vtab1k_dir is not None, self.train_dir is not None]
        if sum(sources) == 0 and self.validation_dir is None:
            raise ValueError(
                "Need --vtab1k_dir, --dataset_name or --train_dir [--validation_dir] (image folders with one "
                "sub-folder per class)."
            )
        if sum(sources) > 1:
            raise ValueError("Give only one data source: --vtab1k_dir, --dataset_name or --train_dir.")
        if self.vtab1k_protocol not in VTAB1K_SPLITS:
            raise ValueError(f"--vtab1k_protocol must be one of {', '.join(VTAB1K_SPLITS)}, got {self.vtab1k_protocol!r}.")


@dataclass
class ModelArguments:
    """Arguments for the model and image processor to fine-tune from."""

    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={"help": "Local folder or Hub model id of the pretrained model."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit id)."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor, if not the model's."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a checkpoint whose classification head has another number of labels."}
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments, Any]:
    """Parse the command line, or a single ``.json`` file holding every argument."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, FlexLoRAArguments)  # FlexLoRA: + FlexLoRAArguments
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))  # type: ignore[return-value]
    return parser.parse_args_into_dataclasses(args=argv)  # type: ignore[return-value]


def load_vtab1k(task_dir: str, protocol: str = "final") -> DatasetDict:  # flexlora_hf extra: VTAB-1k list files
    """A VTAB-1k task folder as ``train`` / ``validation`` splits with an ``image`` and a ``label`` (ClassLabel)
    column. Image paths in the list files are relative to ``task_dir``.

    Raises:
        FileNotFoundError: a list file or an image it names is missing (the message names it).
        ValueError: a line is not ``<path> <integer label>``.
    """
    from datasets import Dataset, Features, Image

    rows: dict[str, tuple[list[str], list[int]]] = {}
    for split, list_name in zip(("train", "validation"), VTAB1K_SPLITS[protocol], strict=True):
        list_path = os.path.join(task_dir, list_name)
        if not os.path.isfile(list_path):
            raise FileNotFoundError(
                f"{list_path} is missing: --vtab1k_dir must be a VTAB-1k task folder with {', '.join(VTAB1K_SPLITS[protocol])} "
                "(see examples/vtab/README.md for where to get them)."
            )
        paths, labels = [], []
        with open(list_path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                relpath, _, label = line.strip().rpartition(" ")
                if not relpath or not label.lstrip("-").isdigit():
                    raise ValueError(f"{list_path}, line {number}: expected '<image path> <integer label>', got {line!r}.")
                path = os.path.join(task_dir, relpath)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{list_path}, line {number}: image {path} does not exist.")
                paths.append(path)
                labels.append(int(label))
        rows[split] = (paths, labels)
    seen = max(max(labels) for _, labels in rows.values()) + 1
    name = os.path.basename(os.path.normpath(task_dir))
    num_classes = max(VTAB1K_NUM_CLASSES.get(name, 0), seen)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(num_classes)])})
    return DatasetDict(
        {
            split: Dataset.from_dict({"image": paths, "label": labels}, features=features)
            for split, (paths, labels) in rows.items()
        }
    )


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> DatasetDict:
    """The raw splits from a VTAB-1k folder, a Hub dataset or image folders."""
    if data_args.vtab1k_dir is not None:
        return load_vtab1k(data_args.vtab1k_dir, data_args.vtab1k_protocol)
    if data_args.dataset_name is not None:
        try:
            return load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
            )
        except Exception as err:  # offline, or a typo in the dataset name
            raise RuntimeError(
                f"Could not load the dataset {data_args.dataset_name!r} from the Hub: {err}. Without Hub access use "
                "--vtab1k_dir or --train_dir/--validation_dir (local image folders)."
            ) from err
    data_files = {}
    if data_args.train_dir is not None:
        data_files["train"] = os.path.join(data_args.train_dir, "**")
    if data_args.validation_dir is not None:
        data_files["validation"] = os.path.join(data_args.validation_dir, "**")
    return load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)


def vit_target_modules(model: torch.nn.Module) -> list[str]:
    """The paper's six ViT matrices per block under this model's module names (see the module docstring)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if any(n.endswith(".q_proj") for n in names) and any(n.endswith(".fc1") for n in names):
        return list(VIT_TARGETS_REFACTORED)
    return list(VIT_TARGETS_CLASSIC)


def summarize_rank_map(rank_map: dict[str, int], initial_rank: int) -> str:
    """Totals, then one line per module whose rank changed (``path: r0 -> r``)."""
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
    logger.info(f"Training/evaluation parameters {training_args}")

    set_seed(training_args.seed)
    dataset = load_raw_datasets(data_args, model_args)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    first_split = "train" if "train" in dataset else next(iter(dataset))
    for column, flag in ((image_column, "--image_column_name"), (label_column, "--label_column_name")):
        if column not in dataset[first_split].column_names:
            raise ValueError(
                f"{flag} {column!r} is not a column of the dataset; its columns are "
                f"{', '.join(dataset[first_split].column_names)}."
            )

    # If there is no validation split, hold out part of train.
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]

    label_feature = dataset[first_split].features[label_column]
    if isinstance(label_feature, ClassLabel):
        labels = list(label_feature.names)
        label_to_id = None
    else:
        labels = [str(v) for v in sorted(dataset[first_split].unique(label_column))]
        label_to_id = {v: i for i, v in enumerate(sorted(dataset[first_split].unique(label_column)))}
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))

    # flexlora_hf extra: the local accuracy module (the transformers example loads "accuracy" from the Hub)
    metric = evaluate.load(os.path.join(METRICS_DIR, "accuracy"), cache_dir=model_args.cache_dir)

    def compute_metrics(p: Any) -> dict[str, float]:
        predictions = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return metric.compute(predictions=np.argmax(predictions, axis=1), references=p.label_ids)

    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=len(labels),
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )

    def transform(example_batch: dict[str, list]) -> dict[str, list]:
        """Resize, rescale and normalise with the model's image processor (no torchvision needed)."""
        images = [image.convert("RGB") for image in example_batch[image_column]]
        example_batch["pixel_values"] = list(image_processor(images, return_tensors="pt")["pixel_values"])
        if label_to_id is not None:
            example_batch[label_column] = [label_to_id[v] for v in example_batch[label_column]]
        return example_batch

    def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example[label_column] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    train_dataset = eval_dataset = None
    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = dataset["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
        train_dataset.set_transform(transform)
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval requires a validation dataset (--validation_dir, or --train_val_split > 0)")
        eval_dataset = dataset["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.shuffle(seed=training_args.seed).select(range(data_args.max_eval_samples))
        eval_dataset.set_transform(transform)

    # The transform reads the raw image column, which the Trainer would otherwise drop before it runs.
    training_args.remove_unused_columns = False
    flexlora_config = flexlora_args.to_flexlora_config(seed=training_args.seed)  # FlexLoRA: build the config
    if flexlora_config.target_modules is None:  # FlexLoRA: the paper's ViT targets under this model's names
        flexlora_config.target_modules = vit_target_modules(model)
    trainer = FlexLoRATrainer(  # FlexLoRA: was Trainer
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
        flexlora_config=flexlora_config,  # FlexLoRA: adapter shape and reallocation schedule
    )

    if training_args.do_train:
        assert train_dataset is not None
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # FlexLoRA: writes the adapter folder (native + PEFT view, rank map, heatmap, card)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        logger.info(  # FlexLoRA: the final rank allocation
            "Final FlexLoRA rank map: %s", summarize_rank_map(trainer.flexlora_model.rank_map(), flexlora_config.r)
        )

    metrics: dict[str, float] = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.push_to_hub:
        from flexlora_hf.io.peft_view import is_local_path

        card: dict[str, Any] = {"pipeline_tag": "image-classification"}
        if not is_local_path(model_args.model_name_or_path):
            card["base_model"] = model_args.model_name_or_path  # FlexLoRA: the card and PEFT view name the base
        if data_args.dataset_name is not None:
            card["datasets"] = [data_args.dataset_name]
        trainer.push_to_hub(**card)
    return metrics


if __name__ == "__main__":
    main()
