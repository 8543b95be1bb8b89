"""BIG-bench tasks as Hugging Face datasets: sequence classification and LM multiple-choice records, offline.

This module turns JSON tasks (read by `bigbench_archive`) into a :class:`datasets.DatasetDict` for sequence
classification or into plain multiple-choice records for LM scoring, and writes them as JSONL for lm-eval.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bigbench_archive import (  # noqa: F401 -- re-exported: the archive API users know from this module
    ARCHIVE_ENV,
    ARCHIVE_NAME,
    BIGBENCH_VERSION,
    bigbench_archive,
    load_task_json,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

# Tasks with a fixed choice set (sequence classification and LM multiple choice).
VITAMINC_FACT_VERIFICATION = "vitaminc_fact_verification"
EPISTEMIC_REASONING = "epistemic_reasoning"
HYPERBATON = "hyperbaton"
STRATEGYQA = "strategyqa"
# Task whose answers vary per question (LM multiple choice only).
SOCIAL_IQA = "social_iqa"

CLASSIFICATION_TASKS: tuple[str, ...] = (VITAMINC_FACT_VERIFICATION, EPISTEMIC_REASONING, HYPERBATON, STRATEGYQA)
MULTIPLE_CHOICE_TASKS: tuple[str, ...] = (SOCIAL_IQA, STRATEGYQA, *CLASSIFICATION_TASKS[:3])
# Below this share of rows carrying the most common choice set, a task counts as having per-row choices.
_FIXED_CHOICE_MIN_SHARE = 0.5


def _task_label(task: str, subtask: str | None) -> str:
    return f"{task}/{subtask}" if subtask else task


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")


def _examples(task_json: dict[str, Any], name: str) -> list[dict[str, Any]]:
    examples = task_json.get("examples")
    if not isinstance(examples, list) or not examples:
        hint = " It may be split into subtasks: pass subtask=<folder name>." if "/" not in name else ""
        raise ValueError(f"BIG-bench task {name!r} has no 'examples' list.{hint}")
    if not any(isinstance(ex, dict) and isinstance(ex.get("target_scores"), dict) for ex in examples):
        raise ValueError(f"BIG-bench task {name!r} has no 'target_scores' (a generative task, not multiple choice).")
    return examples


def _correct_choice(target_scores: dict[str, Any]) -> str | None:
    """The single choice with the top positive score, or ``None`` if there is not exactly one."""
    try:
        scores = {str(k): float(v) for k, v in target_scores.items()}
    except (TypeError, ValueError):
        return None
    if not scores:
        return None
    best = max(scores.values())
    winners = [k for k, v in scores.items() if v == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def _subsample(n: int, max_examples: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_examples is None or max_examples >= n:
        return np.arange(n)
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}.")
    return np.sort(rng.choice(n, size=max_examples, replace=False))


def load_bigbench_classification(
    task: str,
    *,
    validation_fraction: float = 0.2,
    seed: int = 42,
    max_examples: int | None = None,
    archive: str | Path | None = None,
    subtask: str | None = None,
) -> DatasetDict:
    """Load a BIG-bench task with a fixed choice set as a sequence-classification dataset.

    The label set is the task's fixed choice set in order of first appearance. Rows whose correct choice is not
    exactly one member of that set (no or several top-scoring choices, or an answer outside the set) are dropped.

    Args:
        task (`str`):
            Task name, e.g. ``"vitaminc_fact_verification"``, ``"epistemic_reasoning"`` or ``"hyperbaton"``.
        validation_fraction (`float`, *optional*, defaults to 0.2):
            Share of the (kept, subsampled) rows put in the ``validation`` split, in ``[0, 1)``.
        seed (`int`, *optional*, defaults to 42):
            Seed for the subsample and the shuffle before splitting.
        max_examples (`int`, *optional*):
            If set, keep this many rows (a seeded random subset, in original order) before splitting.
        archive (`str` or `Path`, *optional*):
            Path to the archive; see [`load_task_json`].
        subtask (`str`, *optional*):
            Subtask folder for tasks split into subtasks.

    Returns:
        `datasets.DatasetDict`: ``train`` and ``validation`` splits with columns ``text`` (`str`, the example input)
        and ``label`` (`ClassLabel` named after the choices).

    Raises:
        ValueError: if the task's choices vary per row (use [`load_bigbench_multiple_choice`]) or no row is usable.
    """
    _check_fraction(validation_fraction)  # before the archive is read (or downloaded)
    name = _task_label(task, subtask)
    return classification_from_task_json(
        load_task_json(task, archive=archive, subtask=subtask),
        name=name,
        validation_fraction=validation_fraction,
        seed=seed,
        max_examples=max_examples,
    )


def classification_from_task_json(
    task_json: dict[str, Any],
    *,
    name: str,
    validation_fraction: float = 0.2,
    seed: int = 42,
    max_examples: int | None = None,
) -> DatasetDict:
    """The sequence-classification splits of a task already read as a BIG-bench ``task.json`` dictionary.

    The reader behind [`load_bigbench_classification`], for task files that live elsewhere (the quickstart's
    embedded ``examples/data/topics/task.json`` uses the same layout). Same rules for labels, dropped rows,
    subsampling and splitting.

    Args:
        task_json (`dict`): the parsed ``task.json`` (an ``examples`` list of ``input`` + ``target_scores``).
        name (`str`): the task's name in log lines and errors.
        validation_fraction, seed, max_examples: see [`load_bigbench_classification`].

    Returns:
        `datasets.DatasetDict`: ``train`` and ``validation`` splits with columns ``text`` and ``label``.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    _check_fraction(validation_fraction)
    examples = _examples(task_json, name)

    choice_sets: Counter[frozenset[str]] = Counter()
    for ex in examples:
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if isinstance(scores, dict):
            choice_sets[frozenset(str(k) for k in scores)] += 1
    fixed_set, count = choice_sets.most_common(1)[0]
    if count < _FIXED_CHOICE_MIN_SHARE * len(examples) or len(fixed_set) < 2:
        raise ValueError(
            f"BIG-bench task {name!r} has no fixed choice set ({len(choice_sets)} distinct choice sets over "
            f"{len(examples)} examples), so it cannot be a sequence-classification dataset; use "
            "load_bigbench_multiple_choice() instead."
        )

    label_names: list[str] = []
    for ex in examples:
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if isinstance(scores, dict):
            for key in map(str, scores):
                if key in fixed_set and key not in label_names:
                    label_names.append(key)
    label_index = {label: i for i, label in enumerate(label_names)}

    texts: list[str] = []
    labels: list[int] = []
    for ex in examples:
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        text = ex.get("input") if isinstance(ex, dict) else None
        correct = _correct_choice(scores) if isinstance(scores, dict) else None
        if not isinstance(text, str) or correct is None or correct not in label_index:
            continue
        texts.append(text)
        labels.append(label_index[correct])
    dropped = len(examples) - len(texts)
    if dropped:
        logger.info(
            "%s: dropped %d of %d rows without exactly one correct choice in %s",
            name,
            dropped,
            len(examples),
            label_names,
        )
    if not texts:
        raise ValueError(f"BIG-bench task {name!r} has no usable rows for labels {label_names}.")

    rng = np.random.default_rng(seed)
    keep = _subsample(len(texts), max_examples, rng)
    order = keep[rng.permutation(len(keep))]
    n_val = round(len(order) * validation_fraction)
    if validation_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    val_idx, train_idx = order[:n_val], order[n_val:]

    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})

    def build(idx: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}, features=features
        )

    splits = DatasetDict({"train": build(train_idx), "validation": build(val_idx)})
    logger.info("Loaded %s: %d train / %d validation rows, labels %s", name, len(train_idx), len(val_idx), label_names)
    return splits


def load_bigbench_multiple_choice(
    task: str,
    *,
    max_examples: int | None = None,
    seed: int = 42,
    archive: str | Path | None = None,
    subtask: str | None = None,
) -> list[dict[str, Any]]:
    """Load a BIG-bench task as multiple-choice records for LM scoring (e.g. ``social_iqa``, ``strategyqa``).

    Choices keep the order of the example's ``target_scores``; rows without exactly one top-scoring choice are
    dropped.

    Args:
        task (`str`):
            Task name, e.g. ``"social_iqa"``.
        max_examples (`int`, *optional*):
            If set, keep this many rows (a seeded random subset, in original order).
        seed (`int`, *optional*, defaults to 42):
            Seed for the subsample.
        archive (`str` or `Path`, *optional*):
            Path to the archive; see [`load_task_json`].
        subtask (`str`, *optional*):
            Subtask folder for tasks split into subtasks.

    Returns:
        `list[dict]`: records ``{"question": str, "choices": list[str], "label": int}`` with ``label`` indexing
        ``choices``.
    """
    name = _task_label(task, subtask)
    examples = _examples(load_task_json(task, archive=archive, subtask=subtask), name)
    records: list[dict[str, Any]] = []
    for ex in examples:
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        question = ex.get("input") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or not isinstance(question, str) or len(scores) < 2:
            continue
        correct = _correct_choice(scores)
        if correct is None:
            continue
        choices = [str(k) for k in scores]
        records.append({"question": question, "choices": choices, "label": choices.index(correct)})
    dropped = len(examples) - len(records)
    if dropped:
        logger.info("%s: dropped %d of %d rows without exactly one correct choice", name, dropped, len(examples))
    keep = _subsample(len(records), max_examples, np.random.default_rng(seed))
    return [records[i] for i in keep]


def write_task_jsonl(
    task: str,
    output_path: str | Path,
    *,
    subtask: str | None = None,
    archive: str | Path | None = None,
    max_examples: int | None = None,
    seed: int = 42,
) -> Path:
    """Write a task's multiple-choice records as JSON lines (e.g. for an lm-eval custom task).

    Args:
        task (`str`):
            Task name.
        output_path (`str` or `Path`):
            Destination ``.jsonl`` file; parent folders are created.
        subtask (`str`, *optional*):
            Subtask folder for tasks split into subtasks.
        archive (`str` or `Path`, *optional*):
            Path to the archive; see [`load_task_json`].
        max_examples (`int`, *optional*):
            Seeded subsample size.
        seed (`int`, *optional*, defaults to 42):
            Seed for the subsample.

    Returns:
        `Path`: the written file, one ``{"question", "choices", "label"}`` object per line.
    """
    records = load_bigbench_multiple_choice(
        task, max_examples=max_examples, seed=seed, archive=archive, subtask=subtask
    )
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    shutil.move(tmp, path)
    return path
