"""Real benchmark data from the BIG-bench source archive on PyPI, fully offline after one download.

This module owns everything about BIG-bench data: locating (or downloading once, with ``pip download``) the
``bigbench-1.0.0.tar.gz`` source archive, extracting single ``task.json`` files from it with a JSON cache beside the
archive, and turning JSON tasks into a :class:`datasets.DatasetDict` for sequence classification or into plain
multiple-choice records for LM scoring. The ``bigbench`` package itself is never installed (it pulls TensorFlow).

Cache layout (root ``~/.cache/flexlora_hf``, overridable with ``FLEXLORA_HF_CACHE``)::

    <root>/bigbench/bigbench-1.0.0.tar.gz
    <root>/bigbench/bigbench-1.0.0.tasks/<task>[/<subtask>]/task.json

``FLEXLORA_HF_BIGBENCH_ARCHIVE`` may point to an existing archive instead (its extracted JSON is cached beside it).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import cache_root

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
ARCHIVE_ENV = "FLEXLORA_HF_BIGBENCH_ARCHIVE"
TASKS_PREFIX = "bigbench/benchmark_tasks"

# Tasks with a fixed choice set (sequence classification and LM multiple choice).
VITAMINC_FACT_VERIFICATION = "vitaminc_fact_verification"
EPISTEMIC_REASONING = "epistemic_reasoning"
HYPERBATON = "hyperbaton"
STRATEGYQA = "strategyqa"
# Task whose answers vary per question (LM multiple choice only).
SOCIAL_IQA = "social_iqa"

CLASSIFICATION_TASKS: tuple[str, ...] = (VITAMINC_FACT_VERIFICATION, EPISTEMIC_REASONING, HYPERBATON, STRATEGYQA)
MULTIPLE_CHOICE_TASKS: tuple[str, ...] = (SOCIAL_IQA, STRATEGYQA, *CLASSIFICATION_TASKS[:3])

# pip version used when the running pip refuses bigbench's metadata (see _pip_download_archive).
_FALLBACK_PIP = "25.3"
# Below this share of rows carrying the most common choice set, a task counts as having per-row choices.
_FIXED_CHOICE_MIN_SHARE = 0.5


def _default_cache_dir() -> Path:
    return cache_root() / "bigbench"


def _archive_location(archive: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Where the archive is (or would be), without downloading anything."""
    if archive is not None:
        return Path(archive).expanduser()
    env_archive = os.environ.get(ARCHIVE_ENV)
    if env_archive:
        return Path(env_archive).expanduser()
    directory = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    return directory / ARCHIVE_NAME


def bigbench_archive(cache_dir: str | Path | None = None) -> Path:
    """Return the path of the BIG-bench source archive, downloading it once with ``pip download`` if absent.

    The package is only downloaded (``pip download --no-deps bigbench==1.0.0``), never installed.

    Args:
        cache_dir (`str` or `Path`, *optional*):
            Folder holding the archive. Defaults to ``~/.cache/flexlora_hf/bigbench`` (the root follows the
            ``FLEXLORA_HF_CACHE`` environment variable). Ignored when ``FLEXLORA_HF_BIGBENCH_ARCHIVE`` is set.

    Returns:
        `Path`: the ``bigbench-1.0.0.tar.gz`` archive.

    Raises:
        FileNotFoundError: if ``FLEXLORA_HF_BIGBENCH_ARCHIVE`` names a missing file.
        RuntimeError: if ``pip download`` fails (e.g. no access to PyPI).
    """
    env_archive = os.environ.get(ARCHIVE_ENV)
    if env_archive:
        path = Path(env_archive).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ARCHIVE_ENV}={env_archive!r} does not point to an existing file.")
        return path

    path = _archive_location(cache_dir=cache_dir)
    if path.is_file():
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading the BIG-bench source archive (~358 MB) with pip into %s", path.parent)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        downloaded = _pip_download_archive(Path(tmp))
        os.replace(downloaded, path)
    logger.info("Downloaded %s (%.0f MB) in %.1f s", path, path.stat().st_size / 1e6, time.perf_counter() - start)
    return path


def _run_pip(pip: list[str], args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pip, *args], capture_output=True, text=True, check=False)


def _pip_download_archive(tmp: Path) -> Path:
    """``pip download`` the sdist into ``tmp``, falling back to an older pip run from its wheel.

    Recent pip (26.3 here) refuses sdists from PyPI whose metadata declares direct URL dependencies, even with
    ``--no-deps``, and ``bigbench`` 1.0.0 declares ``bleurt @ file://...``. pip 25.3, fetched with ``pip download``
    and run straight from its wheel (nothing is installed), still downloads the archive.
    """
    args = ["download", "--no-deps", "--disable-pip-version-check", f"bigbench=={BIGBENCH_VERSION}", "-d", str(tmp)]
    pip = [sys.executable, "-m", "pip"]
    result = _run_pip(pip, args)
    if result.returncode != 0 and "direct URL dependencies" in result.stderr:
        logger.info("This pip refuses bigbench's direct URL dependency; retrying with pip==%s", _FALLBACK_PIP)
        wheel_dir = tmp / "pip-wheel"
        fetch = _run_pip(pip, ["download", "--no-deps", f"pip=={_FALLBACK_PIP}", "-d", str(wheel_dir)])
        wheels = sorted(wheel_dir.glob(f"pip-{_FALLBACK_PIP}-*.whl"))
        if fetch.returncode == 0 and wheels:
            pip = [sys.executable, str(wheels[0] / "pip")]
            result = _run_pip(pip, args)
        else:
            result = fetch
    downloaded = tmp / ARCHIVE_NAME
    if result.returncode != 0 or not downloaded.is_file():
        raise RuntimeError(
            f"`{' '.join([*pip, *args])}` failed (exit code {result.returncode}); cannot get {ARCHIVE_NAME}. "
            f"Download it elsewhere and set {ARCHIVE_ENV}=/path/to/{ARCHIVE_NAME}.\n{result.stderr[-2000:]}"
        )
    return downloaded


def _task_relpath(task: str, subtask: str | None) -> str:
    return f"{task}/{subtask}/task.json" if subtask else f"{task}/task.json"


def _json_cache_path(archive_path: Path, task: str, subtask: str | None) -> Path:
    stem = archive_path.name.removesuffix(".gz").removesuffix(".tar")
    return archive_path.parent / f"{stem}.tasks" / _task_relpath(task, subtask)


def _validate_name(name: str, what: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"Invalid BIG-bench {what} name {name!r}.")


def _read_from_archive(archive_path: Path, task: str, subtask: str | None) -> bytes:
    """Stream through the archive and return the bytes of one ``task.json`` (stops at the first match)."""
    suffix = f"/{TASKS_PREFIX}/{_task_relpath(task, subtask)}"
    tasks_marker = f"/{TASKS_PREFIX}/"
    task_files: dict[str, set[str]] = {}  # task -> files/folders directly inside it
    start = time.perf_counter()
    with tarfile.open(archive_path, mode="r:*") as tar:
        for member in tar:
            name = member.name
            if member.isfile() and name.endswith(suffix) and name.count("/") == suffix.count("/"):
                fileobj = tar.extractfile(member)
                if fileobj is None:  # pragma: no cover - regular files always have data
                    break
                data = fileobj.read()
                logger.info("Extracted %s from %s in %.1f s", name, archive_path.name, time.perf_counter() - start)
                return data
            _, sep, rest = name.partition(tasks_marker)
            if sep and rest:
                parts = rest.split("/")
                entries = task_files.setdefault(parts[0], set())
                if len(parts) > 1:
                    entries.add(parts[1])

    task_names = sorted(t for t in task_files if not t.startswith((".", "_")))
    if task not in task_files:
        close = difflib.get_close_matches(task, task_names, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(f"BIG-bench task {task!r} not found in {archive_path.name} ({len(task_names)} tasks).{hint}")
    entries = task_files[task]
    subtasks = sorted(e for e in entries if "." not in e and not e.startswith(("_", ".")) and e != "results")
    if subtask is not None:
        close = difflib.get_close_matches(subtask, subtasks, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else f" Subtasks: {', '.join(subtasks) or 'none'}."
        raise ValueError(f"BIG-bench task {task!r} has no subtask {subtask!r} with a task.json.{hint}")
    if "task.py" in entries:
        raise ValueError(f"BIG-bench task {task!r} is a programmatic task (task.py), not a JSON task.")
    raise ValueError(
        f"BIG-bench task {task!r} has no top-level task.json; pass subtask= (one of: {', '.join(subtasks)})."
    )


def load_task_json(task: str, *, archive: str | Path | None = None, subtask: str | None = None) -> dict[str, Any]:
    """Load one BIG-bench JSON task, extracting only its ``task.json`` and caching it beside the archive.

    Args:
        task (`str`):
            Task folder name under ``bigbench/benchmark_tasks``, e.g. ``"epistemic_reasoning"``.
        archive (`str` or `Path`, *optional*):
            Path to ``bigbench-1.0.0.tar.gz``. Defaults to ``FLEXLORA_HF_BIGBENCH_ARCHIVE`` or the cached download
            (see [`bigbench_archive`]), downloading it if needed.
        subtask (`str`, *optional*):
            Subtask folder inside the task, for tasks split into subtasks.

    Returns:
        `dict`: the parsed ``task.json`` (with an ``"examples"`` list).

    Raises:
        ValueError: if the task (or subtask) has no ``task.json`` in the archive; the message lists close names.
    """
    _validate_name(task, "task")
    if subtask is not None:
        _validate_name(subtask, "subtask")
    location = _archive_location(archive)
    cache_path = _json_cache_path(location, task, subtask)
    if cache_path.is_file():
        logger.debug("Using cached %s", cache_path)
        with cache_path.open(encoding="utf-8") as f:
            return dict(json.load(f))

    if archive is not None:
        archive_path = location
        if not archive_path.is_file():
            raise FileNotFoundError(f"BIG-bench archive {archive_path} does not exist.")
    else:
        archive_path = bigbench_archive()
    data = _read_from_archive(archive_path, task, subtask)
    parsed = json.loads(data.decode("utf-8"))
    if not isinstance(parsed, dict):
        raise ValueError(f"{_task_relpath(task, subtask)} in {archive_path.name} is not a JSON object.")

    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, cache_path)
    except OSError as err:
        logger.warning("Could not cache %s at %s: %s", task, cache_path, err)
    return parsed


def _task_label(task: str, subtask: str | None) -> str:
    return f"{task}/{subtask}" if subtask else task


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
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    name = _task_label(task, subtask)
    examples = _examples(load_task_json(task, archive=archive, subtask=subtask), name)

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
