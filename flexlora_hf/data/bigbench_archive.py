"""The BIG-bench source archive on PyPI: locate or download it once, and read single `task.json` files from it.

The ``bigbench`` package itself is never installed (it pulls TensorFlow): ``pip download`` fetches its source
archive once, and task files are extracted one at a time into a JSON cache beside it.

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
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from ..constants import cache_root

logger = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
ARCHIVE_ENV = "FLEXLORA_HF_BIGBENCH_ARCHIVE"
TASKS_PREFIX = "bigbench/benchmark_tasks"

# pip version used when the running pip refuses bigbench's metadata (see _pip_download_archive).
_FALLBACK_PIP = "25.3"


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
