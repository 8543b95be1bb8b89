"""`push_to_hub` / loading from a Hub repo id, against the loopback Hub stand-in (`tests/hub_stub.py`).

Nothing leaves 127.0.0.1: the `local_hub` fixture points `huggingface_hub` (and PEFT, which downloads through it)
at a `LocalHub` on the loopback interface.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers import PNG_SIGNATURE, logits, tiny_bert, tiny_llama, trained
from hub_stub import LocalHub
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from peft import PeftModel

from flexlora_hf import FlexLoRAModel

TOKEN = "hf_test_token"  # the `local_hub` fixture's user "tester"


@pytest.fixture(scope="module")
def llama_adapter() -> FlexLoRAModel:
    return trained(tiny_llama)


def _front_matter(readme: bytes) -> dict:
    text = readme.decode("utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_push_and_load_round_trip(local_hub: LocalHub, llama_adapter: FlexLoRAModel) -> None:
    url = llama_adapter.push_to_hub("tester/flex", token=TOKEN, model_card_kwargs={"datasets": ["allenai/social_i_qa"]})
    assert url.startswith(f"{local_hub.endpoint}/tester/flex/commit/")

    files = local_hub.files("tester/flex")
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "flexlora_config.json",
        "flexlora_adapter.safetensors",
        "rank_map.json",
        "rank_history.json",
        "README.md",
    ):
        assert name in files, name
    assert files["rank_heatmap.png"][:8] == PNG_SIGNATURE

    meta = _front_matter(files["README.md"])
    assert meta["library_name"] == "peft"
    assert {"flexlora", "lora", "peft"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["allenai/social_i_qa"]
    card = ModelCard.load("tester/flex")
    assert card.data.library_name == "peft"
    assert 'PeftModel.from_pretrained(base, "tester/flex")' in card.text
    assert "(rank_heatmap.png)" in card.text

    expected = logits(llama_adapter)
    peft_model = PeftModel.from_pretrained(tiny_llama(), "tester/flex").eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    loaded = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex")
    assert torch.equal(logits(loaded), expected)
    assert loaded.rank_map() == llama_adapter.rank_map()
    assert loaded.rank_history == llama_adapter.rank_history


def test_classifier_with_head_through_the_hub(local_hub: LocalHub) -> None:
    fm = trained(tiny_bert, events=1)
    fm.push_to_hub("tester/flex-cls", token=TOKEN, commit_message="first version")
    assert _front_matter(local_hub.files("tester/flex-cls")["README.md"])["pipeline_tag"] == "text-classification"
    expected = logits(fm)
    peft_model = PeftModel.from_pretrained(tiny_bert(), "tester/flex-cls").eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(FlexLoRAModel.from_pretrained(tiny_bert(), "tester/flex-cls")), expected)


def test_second_push_and_pull_request(local_hub: LocalHub, llama_adapter: FlexLoRAModel) -> None:
    first = llama_adapter.push_to_hub("tester/flex", token=TOKEN)
    # Saving is deterministic, so pushing the same adapter again makes no empty commit.
    assert llama_adapter.push_to_hub("tester/flex", token=TOKEN) == first
    second = llama_adapter.push_to_hub(
        "tester/flex", token=TOKEN, create_pr=True, commit_message="proposal", model_card_kwargs={"metrics": ["f1"]}
    )
    assert second != first
    assert _front_matter(local_hub.files("tester/flex", revision="refs/pr/1")["README.md"])["metrics"] == ["f1"]
    assert "metrics" not in _front_matter(local_hub.files("tester/flex")["README.md"])


def test_load_a_revision(local_hub: LocalHub, llama_adapter: FlexLoRAModel) -> None:
    llama_adapter.push_to_hub("tester/flex", token=TOKEN)
    other = trained(tiny_llama, events=1)
    other.push_to_hub("tester/flex", token=TOKEN, create_pr=True)
    from_main = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex")
    from_pr = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex", revision="refs/pr/1")
    assert torch.equal(logits(from_main), logits(llama_adapter))
    assert torch.equal(logits(from_pr), logits(other))
    assert from_pr.rank_history == other.rank_history


def test_token_is_never_logged_or_written(
    local_hub: LocalHub, llama_adapter: FlexLoRAModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG):
            llama_adapter.push_to_hub("tester/flex", token=TOKEN)
            FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex", token=TOKEN)
    finally:
        root.removeHandler(handler)
    assert TOKEN not in caplog.text and TOKEN not in stream.getvalue()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for content in local_hub.files("tester/flex").values():
        assert TOKEN.encode() not in content


def test_loading_a_missing_repo(local_hub: LocalHub) -> None:
    with pytest.raises(RepositoryNotFoundError):
        FlexLoRAModel.from_pretrained(tiny_llama(), "tester/does-not-exist")


# ---------------------------------------------------------------------------------------------------- auth failures
# The stub's refusals themselves (401 without or with an unknown token, 403 outside one's namespace, 404 for another
# user's private repo) are tested once, through the raw client, in test_hub_stub.py. Here only what FlexLoRA adds:
# `from_pretrained` forwards `token`, and `push_to_hub` surfaces the Hub's refusal unchanged and leaves nothing behind.
def test_private_repo_needs_the_token(local_hub: LocalHub, llama_adapter: FlexLoRAModel) -> None:
    llama_adapter.push_to_hub("tester/secret", token=TOKEN, private=True)
    # Anonymous first: once downloaded, huggingface_hub serves the local cache when the Hub refuses access.
    with pytest.raises(RepositoryNotFoundError):
        FlexLoRAModel.from_pretrained(tiny_llama(), "tester/secret")
    loaded = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/secret", token=TOKEN)
    assert loaded.rank_map() == llama_adapter.rank_map()


def test_push_without_token_fails_with_the_hubs_message(local_hub: LocalHub, llama_adapter: FlexLoRAModel) -> None:
    with pytest.raises(HfHubHTTPError) as info:
        llama_adapter.push_to_hub("tester/flex")
    assert info.value.response.status_code == 401
    assert "Invalid username or password" in str(info.value)
    assert local_hub.repo_ids() == []
