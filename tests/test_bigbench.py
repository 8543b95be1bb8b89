"""Tests for flexlora_hf.data.bigbench on a tiny archive with the real BIG-bench layout (no network, no download)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from flexlora_hf.data import bigbench
from flexlora_hf.data.bigbench import (
    load_bigbench_classification,
    load_bigbench_multiple_choice,
    load_task_json,
    write_task_jsonl,
)

TOP = "bigbench-1.0.0/bigbench/benchmark_tasks"
NLI_CHOICES = ("True", "False", "Neither")
N_GOOD_NLI = 50


def _nli_examples() -> list[dict[str, Any]]:
    examples = []
    for i in range(N_GOOD_NLI):
        correct = NLI_CHOICES[i % 3]
        examples.append({"input": f"claim {i}", "target_scores": {c: int(c == correct) for c in NLI_CHOICES}})
    # Rows without exactly one correct choice in the fixed set: all dropped by the classification loader.
    examples.insert(3, {"input": "bad none", "target_scores": {"True": 0, "False": 0, "Neither": 0}})
    examples.insert(7, {"input": "bad two", "target_scores": {"True": 1, "False": 1, "Neither": 0}})
    examples.insert(11, {"input": "bad outside", "target_scores": {"True": 0, "False": 0, "Maybe": 1}})
    examples.append({"input": "bad no scores", "target": "True"})
    return examples


def _social_examples() -> list[dict[str, Any]]:
    examples = []
    for i in range(30):
        answers = [f"answer {i}-{j}" for j in range(3)]
        examples.append(
            {"input": f"question {i}?", "target_scores": {a: int(j == i % 3) for j, a in enumerate(answers)}}
        )
    examples.append({"input": "ambiguous?", "target_scores": {"x": 1, "y": 1, "z": 0}})
    return examples


TASKS: dict[str, Any] = {
    "toy_nli/task.json": {"name": "toy_nli", "examples": _nli_examples()},
    "toy_nli/README.md": "# toy",
    "toy_yes_no/task.json": {
        "name": "toy_yes_no",
        "examples": [
            {"input": f"q{i}", "target_scores": {"No": int(i % 2 == 0), "Yes": int(i % 2 == 1)}} for i in range(10)
        ],
    },
    "toy_split/task.json": {"name": "toy_split", "description": "metadata only, examples live in subtasks"},
    "toy_split/easy/task.json": {
        "name": "easy",
        "examples": [{"input": f"e{i}", "target_scores": {"yes": int(i < 5), "no": int(i >= 5)}} for i in range(10)],
    },
    "toy_split/hard/task.json": {"name": "hard", "examples": [{"input": "h", "target_scores": {"yes": 1, "no": 0}}]},
    "toy_social/task.json": {"name": "toy_social", "examples": _social_examples()},
    "toy_program/task.py": "# programmatic task\n",
}


def _build_archive(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, content in TASKS.items():
            data = (content if isinstance(content, str) else json.dumps(content)).encode()
            info = tarfile.TarInfo(f"{TOP}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo("bigbench-1.0.0/README.md")
        readme.size = 2
        tar.addfile(readme, io.BytesIO(b"hi"))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXLORA_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLEXLORA_HF_BIGBENCH_ARCHIVE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "archive"
    folder.mkdir()
    path = _build_archive(folder / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv("FLEXLORA_HF_BIGBENCH_ARCHIVE", str(path))
    return path


def _rows(split: Any) -> list[tuple[str, int]]:
    return list(zip(split["text"], split["label"], strict=True))


def test_classification_splits_labels_and_determinism(archive: Path) -> None:
    dd = load_bigbench_classification("toy_nli", validation_fraction=0.2, seed=0)
    assert set(dd) == {"train", "validation"}
    assert (len(dd["train"]), len(dd["validation"])) == (40, 10)
    assert dd["train"].column_names == ["text", "label"]
    assert dd["train"].features["label"].names == list(NLI_CHOICES)

    rows = _rows(dd["train"]) + _rows(dd["validation"])
    expected = {(f"claim {i}", i % 3) for i in range(N_GOOD_NLI)}
    assert set(rows) == expected  # every good row once, correct label, bad rows dropped
    assert not any(text.startswith("bad") for text, _ in rows)

    again = load_bigbench_classification("toy_nli", validation_fraction=0.2, seed=0)
    assert _rows(again["train"]) == _rows(dd["train"])
    assert _rows(again["validation"]) == _rows(dd["validation"])
    other = load_bigbench_classification("toy_nli", validation_fraction=0.2, seed=1)
    assert _rows(other["validation"]) != _rows(dd["validation"])


def test_label_names_follow_first_appearance(archive: Path) -> None:
    dd = load_bigbench_classification("toy_yes_no", validation_fraction=0.3)
    assert dd["train"].features["label"].names == ["No", "Yes"]
    assert (len(dd["train"]), len(dd["validation"])) == (7, 3)
    for text, label in _rows(dd["train"]) + _rows(dd["validation"]):
        assert label == int(text[1:]) % 2


def test_max_examples_subsamples_before_split(archive: Path) -> None:
    a = load_bigbench_classification("toy_nli", max_examples=20, seed=3)
    b = load_bigbench_classification("toy_nli", max_examples=20, seed=3)
    assert (len(a["train"]), len(a["validation"])) == (16, 4)
    assert _rows(a["train"]) == _rows(b["train"]) and _rows(a["validation"]) == _rows(b["validation"])
    assert len({text for text, _ in _rows(a["train"]) + _rows(a["validation"])}) == 20


def test_validation_fraction_zero_and_invalid(archive: Path) -> None:
    dd = load_bigbench_classification("toy_nli", validation_fraction=0.0)
    assert (len(dd["train"]), len(dd["validation"])) == (N_GOOD_NLI, 0)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_bigbench_classification("toy_nli", validation_fraction=1.0)


def test_unknown_task_lists_close_names(archive: Path) -> None:
    with pytest.raises(ValueError, match="not found") as err:
        load_task_json("toy_nly")
    assert "toy_nli" in str(err.value)
    with pytest.raises(ValueError, match="Invalid"):
        load_task_json("../etc")


def test_subtasks(archive: Path) -> None:
    easy = load_task_json("toy_split", subtask="easy")
    assert easy["name"] == "easy" and len(easy["examples"]) == 10
    dd = load_bigbench_classification("toy_split", subtask="easy", validation_fraction=0.2)
    assert dd["train"].features["label"].names == ["yes", "no"]
    assert len(dd["train"]) + len(dd["validation"]) == 10
    with pytest.raises(ValueError, match="subtask"):
        load_bigbench_classification("toy_split")
    with pytest.raises(ValueError, match="easy"):
        load_task_json("toy_split", subtask="eazy")


def test_programmatic_task_error(archive: Path) -> None:
    with pytest.raises(ValueError, match="programmatic"):
        load_task_json("toy_program")


def test_varying_choices_need_multiple_choice_loader(archive: Path) -> None:
    with pytest.raises(ValueError, match="load_bigbench_multiple_choice"):
        load_bigbench_classification("toy_social")


def test_multiple_choice_loader(archive: Path) -> None:
    records = load_bigbench_multiple_choice("toy_social")
    assert len(records) == 30  # the row with two correct answers is dropped
    for i, record in enumerate(records):
        assert set(record) == {"question", "choices", "label"}
        assert record["question"] == f"question {i}?"
        assert record["choices"] == [f"answer {i}-{j}" for j in range(3)]
        assert record["label"] == i % 3

    sub = load_bigbench_multiple_choice("toy_social", max_examples=5, seed=7)
    assert sub == load_bigbench_multiple_choice("toy_social", max_examples=5, seed=7)
    assert len(sub) == 5 and all(r in records for r in sub)

    nli = load_bigbench_multiple_choice("toy_nli")
    assert len(nli) == N_GOOD_NLI + 1  # the "Maybe" row is a valid multiple-choice row
    assert nli[0] == {"question": "claim 0", "choices": list(NLI_CHOICES), "label": 0}


def test_write_task_jsonl(archive: Path, tmp_path: Path) -> None:
    out = write_task_jsonl("toy_social", tmp_path / "out" / "social.jsonl", max_examples=4)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == load_bigbench_multiple_choice("toy_social", max_examples=4)


def test_extracted_json_is_cached_beside_archive(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_bigbench_classification("toy_nli")
    cached = archive.parent / "bigbench-1.0.0.tasks" / "toy_nli" / "task.json"
    assert cached.is_file()
    load_task_json("toy_split", subtask="easy")
    assert (archive.parent / "bigbench-1.0.0.tasks" / "toy_split" / "easy" / "task.json").is_file()

    archive.unlink()

    def no_tar(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the archive was reopened")

    monkeypatch.setattr(tarfile, "open", no_tar)
    second = load_bigbench_classification("toy_nli")
    assert _rows(second["train"]) == _rows(first["train"])
    assert load_task_json("toy_split", subtask="easy")["name"] == "easy"


def test_explicit_archive_argument(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXLORA_HF_BIGBENCH_ARCHIVE")
    assert load_task_json("toy_yes_no", archive=archive)["name"] == "toy_yes_no"
    with pytest.raises(FileNotFoundError):
        load_task_json("toy_yes_no", archive=archive.parent / "missing.tar.gz")


def test_bigbench_archive_env_and_cache(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pip must not run")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert bigbench.bigbench_archive() == archive
    monkeypatch.setenv("FLEXLORA_HF_BIGBENCH_ARCHIVE", str(tmp_path / "nope.tar.gz"))
    with pytest.raises(FileNotFoundError, match="FLEXLORA_HF_BIGBENCH_ARCHIVE"):
        bigbench.bigbench_archive()

    monkeypatch.delenv("FLEXLORA_HF_BIGBENCH_ARCHIVE")
    cached = tmp_path / "cache" / "bigbench" / "bigbench-1.0.0.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(archive.read_bytes())
    assert bigbench.bigbench_archive() == cached
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "bigbench-1.0.0.tar.gz").write_bytes(b"x")
    assert bigbench.bigbench_archive(cache_dir=other) == other / "bigbench-1.0.0.tar.gz"


def test_download_falls_back_to_older_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if len(calls) == 1:  # current pip refuses the direct URL dependency
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: ... cannot declare direct URL dependencies.")
        dest.mkdir(parents=True, exist_ok=True)
        if "pip==25.3" in cmd:
            (dest / "pip-25.3-py3-none-any.whl").write_bytes(b"wheel")
        else:
            (dest / "bigbench-1.0.0.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = bigbench.bigbench_archive(cache_dir=tmp_path / "dl")
    assert path == tmp_path / "dl" / "bigbench-1.0.0.tar.gz" and path.read_bytes() == b"archive"
    assert len(calls) == 3 and "install" not in {arg for cmd in calls for arg in cmd}
    assert calls[2][1].endswith("pip-25.3-py3-none-any.whl/pip")
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["bigbench-1.0.0.tar.gz"]  # temp folder cleaned up


def test_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No matching distribution")
    )
    with pytest.raises(RuntimeError, match="FLEXLORA_HF_BIGBENCH_ARCHIVE"):
        bigbench.bigbench_archive(cache_dir=tmp_path / "dl")
