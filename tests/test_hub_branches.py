"""Branches on the Hub, and naming the base model honestly, against the loopback Hub stand-in (`tests/hub_stub.py`).

* the stand-in's `create_branch` / `delete_branch` and revision-aware upload and download, driven by the real
  `huggingface_hub` client;
* `push_to_hub(..., revision="branch")` creates a missing branch, leaves `main` alone, and
  `FlexLoRAModel.from_pretrained(base, repo, revision=...)` loads each revision's own adapter;
* a base model loaded from a local folder: the card says so (no useless path in its metadata), and
  `push_to_hub(base_model=...)` fills the card's `base_model` and the PEFT view's `base_model_name_or_path`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from helpers import logits, tiny_llama, trained
from hub_stub import LocalHub, use_local_hub
from huggingface_hub import HfApi, hf_hub_download, list_repo_files
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from peft import PeftModel
from transformers import LlamaForCausalLM

from flexlora_hf import FlexLoRAModel
from flexlora_hf.io.save import save_flexlora

TOKEN = "hf_test_token"
OTHER_TOKEN = "hf_other_token"
HUB_BASE = "HuggingFaceTB/SmolLM2-135M"


def _front_matter(readme: bytes) -> dict:
    return yaml.safe_load(readme.decode("utf-8").split("---\n", 2)[1])


@pytest.fixture(scope="module")
def adapters() -> tuple[FlexLoRAModel, FlexLoRAModel]:
    return trained(tiny_llama), trained(tiny_llama, events=1)


@pytest.fixture(scope="module")
def local_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama saved as an ordinary model folder: loading it records the folder as `_name_or_path`."""
    path = tmp_path_factory.mktemp("local_base") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- the stand-in
def test_stub_create_branch_upload_and_download_per_revision(local_hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("tester/branchy")
    api.upload_file(path_or_fileobj=b"main v1", path_in_repo="a.txt", repo_id="tester/branchy")
    api.create_branch("tester/branchy", branch="dev")
    with pytest.raises(HfHubHTTPError) as info:
        api.create_branch("tester/branchy", branch="dev")
    assert info.value.response.status_code == 409
    api.create_branch("tester/branchy", branch="dev", exist_ok=True)  # no error

    api.upload_file(path_or_fileobj=b"dev v1", path_in_repo="a.txt", repo_id="tester/branchy", revision="dev")
    api.upload_file(path_or_fileobj=b"only on dev", path_in_repo="b.txt", repo_id="tester/branchy", revision="dev")
    assert local_hub.files("tester/branchy")["a.txt"] == b"main v1"
    assert local_hub.files("tester/branchy", revision="dev")["a.txt"] == b"dev v1"
    assert Path(hf_hub_download("tester/branchy", "a.txt")).read_bytes() == b"main v1"
    assert Path(hf_hub_download("tester/branchy", "a.txt", revision="dev")).read_bytes() == b"dev v1"
    assert "b.txt" not in list_repo_files("tester/branchy")
    assert "b.txt" in list_repo_files("tester/branchy", revision="dev")

    # A branch name with a slash, started from another branch.
    api.create_branch("tester/branchy", branch="feature/x", revision="dev")
    assert local_hub.files("tester/branchy", revision="feature/x") == local_hub.files("tester/branchy", revision="dev")
    refs = {b.name for b in api.list_repo_refs("tester/branchy").branches}
    assert refs == {"main", "dev", "feature/x"}

    with pytest.raises(RevisionNotFoundError):
        api.create_branch("tester/branchy", branch="from-nowhere", revision="no-such-branch")
    with pytest.raises(HfHubHTTPError) as info:
        api.create_branch("tester/branchy", branch="refs/pr/7")
    assert info.value.response.status_code == 400
    with pytest.raises(HfHubHTTPError) as info:
        api.delete_branch("tester/branchy", branch="main")
    assert info.value.response.status_code == 403
    api.delete_branch("tester/branchy", branch="feature/x")
    assert {b.name for b in api.list_repo_refs("tester/branchy").branches} == {"main", "dev"}
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tester/branchy", "a.txt", revision="feature/x", force_download=True)


def test_stub_branches_need_write_rights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with LocalHub(tokens={TOKEN: "tester", OTHER_TOKEN: "other"}) as hub:
        use_local_hub(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        HfApi(token=TOKEN).create_repo("tester/guarded")
        with pytest.raises(HfHubHTTPError) as info:
            HfApi(token=OTHER_TOKEN).create_branch("tester/guarded", branch="mine")
        assert info.value.response.status_code == 403
        with pytest.raises(HfHubHTTPError) as info:
            HfApi().create_branch("tester/guarded", branch="anon", token=False)
        assert info.value.response.status_code == 401
        assert {b.name for b in HfApi(token=TOKEN).list_repo_refs("tester/guarded").branches} == {"main"}


# ------------------------------------------------------------------------------------------- push / load a branch
def test_push_to_a_new_branch_and_load_each_revision(
    local_hub: LocalHub, adapters: tuple[FlexLoRAModel, FlexLoRAModel]
) -> None:
    on_main, on_branch = adapters
    assert on_main.rank_map() != on_branch.rank_map()
    # The repo does not exist yet: push_to_hub creates it, then the branch from main's head, then commits there.
    branch_url = on_branch.push_to_hub("tester/flex", token=TOKEN, revision="experiment")
    main_url = on_main.push_to_hub("tester/flex", token=TOKEN)
    assert branch_url != main_url
    branch_files = local_hub.files("tester/flex", revision="experiment")
    main_files = local_hub.files("tester/flex")
    assert branch_files["rank_map.json"] != main_files["rank_map.json"]
    assert json.loads(branch_files["rank_map.json"]) == on_branch.rank_map()
    assert json.loads(main_files["rank_map.json"]) == on_main.rank_map()

    from_main = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex")
    from_branch = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex", revision="experiment")
    assert torch.equal(logits(from_main), logits(on_main))
    assert torch.equal(logits(from_branch), logits(on_branch))
    assert from_branch.rank_history == on_branch.rank_history
    assert not torch.equal(logits(from_main), logits(from_branch))
    # Stock PEFT reads the branch too.
    peft_model = PeftModel.from_pretrained(tiny_llama(), "tester/flex", revision="experiment").eval()
    torch.testing.assert_close(logits(peft_model), logits(on_branch), rtol=1e-5, atol=1e-5)

    # Pushing to the existing branch again commits there (no error on the existing branch), main stays as it was.
    on_main.push_to_hub("tester/flex", token=TOKEN, revision="experiment", commit_message="main's adapter on the branch")
    assert local_hub.files("tester/flex", revision="experiment")["rank_map.json"] == main_files["rank_map.json"]
    assert local_hub.files("tester/flex") == main_files


def test_pull_request_with_a_branch_is_refused_before_touching_the_hub(
    local_hub: LocalHub, adapters: tuple[FlexLoRAModel, FlexLoRAModel]
) -> None:
    # huggingface_hub opens pull requests against the default branch only; refusing up front leaves no stray
    # repo or branch behind.
    with pytest.raises(ValueError, match="create_pr=True opens a pull request against the default branch"):
        adapters[0].push_to_hub("tester/flex-pr", token=TOKEN, revision="review", create_pr=True)
    assert local_hub.repo_ids() == []
    # A further commit to an open pull request goes to refs/pr/N without creating a branch.
    on_main, on_pr = adapters
    on_main.push_to_hub("tester/flex-pr", token=TOKEN)
    trained(tiny_llama, events=2).push_to_hub("tester/flex-pr", token=TOKEN, create_pr=True, commit_message="proposal")
    on_pr.push_to_hub("tester/flex-pr", token=TOKEN, revision="refs/pr/1", commit_message="second thoughts")
    assert {b.name for b in HfApi(token=TOKEN).list_repo_refs("tester/flex-pr").branches} == {"main"}
    loaded = FlexLoRAModel.from_pretrained(tiny_llama(), "tester/flex-pr", revision="refs/pr/1")
    assert loaded.rank_map() == on_pr.rank_map()
    assert json.loads(local_hub.files("tester/flex-pr")["rank_map.json"]) == on_main.rank_map()


# -------------------------------------------------------------------------------------------- naming the base model
def test_local_base_folder_is_named_honestly(local_base_dir: Path, tmp_path: Path) -> None:
    base = LlamaForCausalLM.from_pretrained(local_base_dir)
    fm = trained(lambda: base, events=1)
    save_flexlora(fm, tmp_path)
    peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str(local_base_dir)  # the truth: where it was loaded from
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card.encode())
    assert "base_model" not in meta  # a path on the trainer's disk is no Hub id
    assert f"loaded from a local folder (`{local_base_dir}`)" in card
    assert 'base_model="<hub id of the base model>"' in card
    # The note sits right under the introduction, before the file list.
    assert card.index("This is an **entropy-guided FlexLoRA** adapter") < card.index("local folder") < card.index("## Files")

    save_flexlora(fm, tmp_path / "named", model_card_kwargs={"base_model": HUB_BASE})
    assert json.loads((tmp_path / "named" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    assert json.loads((tmp_path / "named" / "flexlora_config.json").read_text())["_base_model_name_or_path"] == HUB_BASE
    named_card = (tmp_path / "named" / "README.md").read_text()
    assert _front_matter(named_card.encode())["base_model"] == HUB_BASE and "local folder" not in named_card


def test_push_with_base_model_fills_card_and_peft_config(
    local_hub: LocalHub, local_base_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fm = trained(lambda: LlamaForCausalLM.from_pretrained(local_base_dir), events=1)
    with caplog.at_level(logging.WARNING, logger="flexlora_hf.io.hub"):
        fm.push_to_hub("tester/from-local", token=TOKEN)
    assert "loaded from a local folder" in caplog.text and "base_model=" in caplog.text
    files = local_hub.files("tester/from-local")
    assert "base_model" not in _front_matter(files["README.md"])
    assert b"loaded from a local folder" in files["README.md"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexlora_hf.io.hub"):
        fm.push_to_hub("tester/from-local", token=TOKEN, base_model=HUB_BASE)
    assert "local folder" not in caplog.text
    files = local_hub.files("tester/from-local")
    meta = _front_matter(files["README.md"])
    assert meta["base_model"] == HUB_BASE and f"base_model:adapter:{HUB_BASE}" in meta["tags"]
    assert b"loaded from a local folder" not in files["README.md"]
    assert f'from_pretrained("{HUB_BASE}")'.encode() in files["README.md"]  # the loading snippets name it
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == HUB_BASE
    assert json.loads(files["flexlora_config.json"])["_base_model_name_or_path"] == HUB_BASE
    # Still loads exactly, and in stock PEFT, from the Hub.
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_llama(), "tester/from-local").eval()), logits(fm), rtol=1e-5, atol=1e-5
    )


def test_bad_base_model_arguments(local_hub: LocalHub, local_base_dir: Path) -> None:
    fm = trained(tiny_llama, events=1)
    with pytest.raises(ValueError, match="is a local path; pass the base model's Hub id"):
        fm.push_to_hub("tester/bad", token=TOKEN, base_model=str(local_base_dir))
    with pytest.raises(ValueError, match="disagrees with model_card_kwargs"):
        fm.push_to_hub("tester/bad", token=TOKEN, base_model=HUB_BASE, model_card_kwargs={"base_model": "other/model"})
    assert local_hub.repo_ids() == []  # refused before anything reached the Hub
