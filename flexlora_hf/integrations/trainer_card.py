"""The model card and Hub push of `FlexLoRATrainer`: the stock `Trainer.create_model_card` / `push_to_hub` keywords
mapped onto FlexLoRA's rank-map card.

Why a module of its own: transformers' `Trainer.create_model_card` writes its generic `TrainingSummary` card (no
ranks), and when `README.md` already says `library_name: peft` (ours does) it calls
`model.create_or_update_model_card`, which only PEFT models have. Stock example scripts end with
`trainer.create_model_card(finetuned_from=..., tasks=..., dataset_tags=..., ...)` or `trainer.push_to_hub(**same)`,
so this module turns those keywords into [`model_card.build_model_card`] arguments: `finetuned_from` ->
`base_model`, `tasks` -> pipeline tag and the `model-index` task, `dataset_tags` -> `datasets`, `dataset` /
`dataset_args` -> the `model-index` dataset, `language`, `license`, `tags`, `model_name` as they are, and the latest
`eval_*` metrics of the Trainer's log history -> the card's results. The card keeps the rank map and heatmap.

[`TrainerCardMixin`] (a base of `FlexLoRATrainerMixin`) holds the Trainer methods: `create_model_card`,
`push_to_hub` (our folder and card, uploaded by `hub.push_to_hub` after any checkpoint push still in flight), and
the checkpoint pushes of `args.push_to_hub` (both views in every intermediate commit).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..constants import HEATMAP_NAME, MODEL_CARD_NAME, NATIVE_FILES
from ..io.atomic import write_text
from ..io.peft_view import is_local_path

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)

STOCK_CARD_KEYS = (
    "language",
    "license",
    "tags",
    "model_name",
    "finetuned_from",
    "tasks",
    "dataset_tags",
    "dataset",
    "dataset_args",
)
"""`Trainer.create_model_card`'s keywords (also what stock scripts pass to `Trainer.push_to_hub`)."""

FLEXLORA_CARD_KEYS = ("base_model", "datasets", "metrics", "pipeline_tag", "eval_results")
"""`build_model_card` keywords a caller may also pass directly."""

# Trainer's timing entries (eval_runtime, eval_samples_per_second, eval_model_preparation_time, ...) are not
# results of the model.
_NOT_METRICS = ("runtime", "_per_second", "_time")


def latest_eval_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The latest value of every numeric `eval_*` entry of a Trainer log history, without the prefix and without
    timing entries (runtime, throughput, preparation time)."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            name = key[len("eval_") :]
            if key.startswith("eval_") and isinstance(value, (int, float)) and not name.endswith(_NOT_METRICS):
                metrics[name] = float(value)
    return metrics


def _first(value: str | Sequence[str] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value[0]) if len(value) else None


def card_kwargs(
    training_args: Any, log_history: Sequence[Mapping[str, Any]], **kwargs: Any
) -> dict[str, Any]:
    """`build_model_card` keyword arguments for a Trainer run, from stock `create_model_card` keywords.

    Args:
        training_args (`TrainingArguments`): shown as the card's hyper-parameters.
        log_history (`list[dict]`): `trainer.state.log_history`; its latest `eval_*` values are the card's results.
        kwargs: any of `STOCK_CARD_KEYS` and `FLEXLORA_CARD_KEYS` (and TRL's `dataset_name`, as `dataset_tags`).

    Raises:
        TypeError: an unknown keyword (as `Trainer.create_model_card` raises for one).
        ValueError: `finetuned_from` and `base_model` name different models.
    """
    if "dataset_name" in kwargs:  # TRL's create_model_card names the training dataset's Hub id so
        kwargs = dict(kwargs)
        name = kwargs.pop("dataset_name")
        kwargs["dataset_tags"] = kwargs.get("dataset_tags") or name
    unknown = sorted(set(kwargs) - set(STOCK_CARD_KEYS) - set(FLEXLORA_CARD_KEYS))
    if unknown:
        raise TypeError(
            f"FlexLoRATrainer model card: unexpected keyword argument(s) {unknown}; accepted are Trainer's "
            f"{', '.join(STOCK_CARD_KEYS)} and {', '.join(FLEXLORA_CARD_KEYS)}."
        )
    out: dict[str, Any] = {k: kwargs[k] for k in ("language", "license", "tags", "model_name") if kwargs.get(k)}
    out["training_args"] = training_args
    base_model, finetuned_from = kwargs.get("base_model"), kwargs.get("finetuned_from")
    if base_model and finetuned_from and str(base_model) != str(finetuned_from):
        raise ValueError(
            f"FlexLoRATrainer model card: finetuned_from={finetuned_from!r} and base_model={base_model!r} name "
            "different models; pass the base model's Hub id once."
        )
    base_model = base_model or finetuned_from
    if base_model and is_local_path(str(base_model)):
        # A path on this machine is no use to a reader (and push_to_hub refuses it): the card then names no base
        # model and says how to name it, as for a base loaded from a local folder.
        logger.info("Model card: finetuned_from=%r is a local path, so the card names no base model.", base_model)
        base_model = None
    if base_model:
        out["base_model"] = str(base_model)
    task = _first(kwargs.get("tasks"))
    pipeline_tag = kwargs.get("pipeline_tag") or task
    if pipeline_tag:
        out["pipeline_tag"] = pipeline_tag
    datasets = kwargs.get("datasets") or kwargs.get("dataset_tags")
    if datasets:
        out["datasets"] = datasets
    if kwargs.get("metrics"):
        out["metrics"] = kwargs["metrics"]
    results: Any = kwargs.get("eval_results")
    if results is None:
        results = latest_eval_metrics(log_history) or None
        dataset_id = _first(kwargs.get("dataset_tags")) or _first(kwargs.get("datasets"))
        dataset_name = _first(kwargs.get("dataset")) or dataset_id
        if results and task and dataset_id and dataset_name:
            results = _eval_results(results, task, dataset_id, dataset_name, _first(kwargs.get("dataset_args")))
    if results:
        out["eval_results"] = results
    return out


def _eval_results(
    metrics: Mapping[str, float], task: str, dataset_id: str, dataset_name: str, dataset_config: str | None
) -> list[Any]:
    """`model-index` entries (as stock cards write them when the task and dataset are known)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=task,
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in metrics.items()
    ]


def write_trainer_card(model: FlexLoRAModel, output_dir: str, card: Mapping[str, Any]) -> str:
    """Write the FlexLoRA card built from `card` (`card_kwargs`) to `output_dir/README.md`; returns the path."""
    from ..io.model_card import build_model_card

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_CARD_NAME)
    write_text(path, str(build_model_card(model, **dict(card))))
    return path


class TrainerCardMixin:
    """`create_model_card` and `push_to_hub` for `FlexLoRATrainerMixin` (a base of it; see the module docstring)."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the FlexLoRA model card to `output_dir/README.md`: the rank map and heatmap, the training
        arguments and the latest `eval_*` metrics, with `Trainer.create_model_card`'s arguments as metadata.

        Args:
            args, kwargs: `Trainer.create_model_card`'s (`language`, `license`, `tags`, `model_name`,
                `finetuned_from`, `tasks`, `dataset_tags`, `dataset`, `dataset_args`, in that order when positional):
                `finetuned_from` becomes `base_model`, `tasks` the pipeline tag and, with a dataset, the `model-index`
                task (see this module). Also accepted: `build_model_card`'s `base_model`, `datasets`,
                `metrics`, `pipeline_tag`, `eval_results`, and TRL's `dataset_name` (as `dataset_tags`).

        Only the main process writes.
        """
        if len(args) > len(STOCK_CARD_KEYS):
            raise TypeError(f"create_model_card takes at most {len(STOCK_CARD_KEYS)} positional arguments.")
        kwargs = {**dict(zip(STOCK_CARD_KEYS, args, strict=False)), **kwargs}
        card = card_kwargs(self.args, self.state.log_history, **kwargs)  # type: ignore[attr-defined]
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        hub_id = self.args.hub_model_id  # type: ignore[attr-defined]
        if hub_id and "/" in hub_id:
            card["repo_id"] = hub_id  # the loading snippets name the repo it will be pushed to
        write_trainer_card(self.flexlora_model, self.args.output_dir, card)  # type: ignore[attr-defined]

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Publish the adapter folder with the FlexLoRA model card (not transformers' generic card).

        The repo is `args.hub_model_id` (a bare name is put in the token owner's namespace) or the output dir's name.
        Keyword arguments are those of [`create_model_card`] (what stock scripts pass: `finetuned_from`, `tasks`,
        `dataset_tags`, ...), plus `build_model_card`'s; the card is also written to `output_dir`. The upload
        always blocks (`blocking` is accepted for compatibility). Only the main process uploads.

        Returns:
            `str`: URL of the commit (`None` on other processes).
        """
        from huggingface_hub import HfApi

        args = self.args  # type: ignore[attr-defined]
        card = card_kwargs(args, self.state.log_history, **kwargs)  # type: ignore[attr-defined]  # refuse before any upload
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return None
        token = token or args.hub_token
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        if "/" not in repo_id:
            repo_id = f"{HfApi(token=token).whoami()['name']}/{repo_id}"
        self.save_model(_internal_call=True)  # type: ignore[attr-defined]
        finish = getattr(self, "_finish_current_push", None)
        if callable(finish):  # a checkpoint push still uploading (args.push_to_hub) must not land after this one
            finish()
        fm = self.flexlora_model  # type: ignore[attr-defined]
        write_trainer_card(fm, args.output_dir, {**card, "repo_id": repo_id})  # the same card in output_dir
        return fm.push_to_hub(
            repo_id,
            token=token,
            private=private if private is not None else args.hub_private_repo,
            commit_message=commit_message,
            revision=revision or args.hub_revision,
            model_card_kwargs=card,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoint pushes of `args.push_to_hub`: `Trainer` copies the files it knows (the PEFT view) from the
        checkpoint into `output_dir` and uploads `output_dir`; the native view, rank map, history, heatmap and card
        are copied along, so every intermediate commit holds both views of the same adapter."""
        args = self.args  # type: ignore[attr-defined]
        if self.is_world_process_zero() and str(getattr(args.hub_strategy, "value", args.hub_strategy)) != "end":  # type: ignore[attr-defined]
            for name in (*NATIVE_FILES, HEATMAP_NAME, MODEL_CARD_NAME):
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source):
                    shutil.copy(source, os.path.join(args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)  # type: ignore[misc]
