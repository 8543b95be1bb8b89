"""The loopback Hub stand-in (`tests/hub_stub.py`) driven by the real `huggingface_hub` client.

Nothing here leaves 127.0.0.1: every request goes to a `LocalHub` bound to the loopback interface.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hub_stub import LocalHub, git_blob_oid, use_local_hub
from huggingface_hub import (
    HfApi,
    ModelCard,
    constants,
    file_exists,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

TOKEN = "hf_test_token"
OTHER_TOKEN = "hf_other_token"

README = """---
license: apache-2.0
library_name: peft
tags:
- flexlora
- test
---

# Tiny adapter

Uploaded to a LocalHub.
"""


def _make_folder(root: Path) -> dict[str, bytes]:
    """A folder like a saved adapter (JSON config, safetensors weights, model card); returns path -> bytes."""
    tensors = {
        "lora_A.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "lora_B.weight": np.full((4, 3), 0.5, dtype=np.float32),
    }
    files = {
        "adapter_config.json": json.dumps({"r": 3, "peft_type": "LORA", "target_modules": ["proj"]}).encode(),
        "adapter_model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),
        "README.md": README.encode(),
        "extra/notes.txt": b"nested file\n",
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


@pytest.fixture
def two_user_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with LocalHub(tokens={TOKEN: "tester", OTHER_TOKEN: "other"}) as hub:
        use_local_hub(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        yield hub


def test_fixture_points_the_client_at_the_stub(local_hub: LocalHub, tmp_path: Path) -> None:
    assert local_hub.endpoint.startswith("http://127.0.0.1:")
    assert local_hub.endpoint == constants.ENDPOINT
    assert constants.HF_HUB_DISABLE_XET is True
    assert constants.HF_HUB_OFFLINE is False
    assert Path(constants.HF_HUB_CACHE).is_relative_to(tmp_path)
    assert HfApi().endpoint == local_hub.endpoint

    assert HfApi().whoami(token=TOKEN)["name"] == "tester"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().whoami(token="hf_not_a_token")
    assert err.value.response.status_code == 401


def test_create_repo_exist_ok(local_hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    url = api.create_repo("tester/demo")
    assert url.repo_id == "tester/demo"
    assert url.endpoint == local_hub.endpoint

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("tester/demo")
    assert err.value.response.status_code == 409
    assert "already created" in str(err.value)

    assert api.create_repo("demo", exist_ok=True).repo_id == "tester/demo"  # namespace defaults to the caller
    # Like on the Hub, a new repo holds one commit with a .gitattributes file.
    assert list(local_hub.files("tester/demo")) == [".gitattributes"]


def test_upload_folder_then_download_identical_bytes(local_hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    expected = _make_folder(folder)
    api = HfApi(token=TOKEN)
    api.create_repo("tester/adapter")

    commit = api.upload_folder(repo_id="tester/adapter", folder_path=folder, commit_message="add adapter")

    stored = local_hub.files("tester/adapter")
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == expected
    assert commit.oid == model_info("tester/adapter").sha
    assert commit.repo_url.repo_id == "tester/adapter"

    # Public repo: everything below is anonymous.
    assert sorted(list_repo_files("tester/adapter")) == sorted([".gitattributes", *expected])
    for rel, content in expected.items():
        assert Path(hf_hub_download("tester/adapter", rel)).read_bytes() == content
    snapshot = Path(snapshot_download("tester/adapter"))
    downloaded = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert downloaded == stored
    assert snapshot.name == commit.oid

    weights = load_safetensors(downloaded["adapter_model.safetensors"])
    np.testing.assert_array_equal(weights["lora_A.weight"], np.arange(12, dtype=np.float32).reshape(3, 4))

    info = model_info("tester/adapter", files_metadata=True)
    sizes = {s.rfilename: (s.size, s.blob_id) for s in info.siblings}
    assert sizes["adapter_model.safetensors"] == (
        len(expected["adapter_model.safetensors"]),
        git_blob_oid(expected["adapter_model.safetensors"]),
    )
    assert info.card_data is not None and info.card_data.license == "apache-2.0"

    card = ModelCard.load("tester/adapter")
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "peft"
    assert card.data.tags == ["flexlora", "test"]
    assert "Uploaded to a LocalHub." in card.text

    assert file_exists("tester/adapter", "extra/notes.txt")
    assert not file_exists("tester/adapter", "missing.bin")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tester/adapter", "missing.bin")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tester/adapter", "README.md", revision="no-such-branch")


def test_commits_update_delete_and_open_pull_requests(local_hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("tester/history")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="dir/a.txt", repo_id="tester/history")
    api.upload_file(path_or_fileobj=b"keep", path_in_repo="b.txt", repo_id="tester/history")
    # An unchanged file is skipped client-side thanks to the preupload oid: no new commit.
    same = api.upload_file(path_or_fileobj=b"keep", path_in_repo="b.txt", repo_id="tester/history")
    assert same.oid == model_info("tester/history").sha

    api.delete_file("dir/a.txt", repo_id="tester/history")
    assert sorted(local_hub.files("tester/history")) == [".gitattributes", "b.txt"]
    assert local_hub.files("tester/history", revision=first.oid)["dir/a.txt"] == b"v1"
    # Older revisions stay downloadable by commit id.
    assert Path(hf_hub_download("tester/history", "dir/a.txt", revision=first.oid)).read_bytes() == b"v1"

    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="c.txt", repo_id="tester/history", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert "c.txt" in list_repo_files("tester/history", revision="refs/pr/1")
    assert "c.txt" not in list_repo_files("tester/history")

    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="tester/history", parent_commit=first.oid)
    assert err.value.response.status_code == 412


def test_resolve_headers_ranges_tree_and_datasets(local_hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("tester/raw")
    content = bytes(range(200))
    commit = api.upload_file(path_or_fileobj=content, path_in_repo="deep/dir/blob.bin", repo_id="tester/raw")

    url = f"{local_hub.endpoint}/tester/raw/resolve/main/deep/dir/blob.bin"
    head = get_session().head(url)
    assert head.status_code == 200
    assert head.headers["ETag"] == f'"{git_blob_oid(content)}"'
    assert head.headers["X-Repo-Commit"] == commit.oid
    assert head.headers["Content-Length"] == "200"
    partial = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == content[10:20]

    top = {entry.path for entry in api.list_repo_tree("tester/raw")}
    assert top == {".gitattributes", "deep"}
    assert {entry.path for entry in api.list_repo_tree("tester/raw", path_in_repo="deep", recursive=True)} == {
        "deep/dir",
        "deep/dir/blob.bin",
    }
    infos = api.get_paths_info("tester/raw", ["deep/dir/blob.bin", "deep", "missing"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "deep/dir/blob.bin"), ("RepoFolder", "deep")]

    api.create_repo("tester/table", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id="tester/table", repo_type="dataset")
    path = hf_hub_download("tester/table", "data.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert local_hub.files("tester/table", repo_type="dataset")["data.csv"] == b"a,b\n1,2\n"


def test_push_without_token_is_401(local_hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    _make_folder(folder)
    HfApi(token=TOKEN).create_repo("tester/locked")

    with pytest.raises(HfHubHTTPError) as err:
        HfApi().upload_folder(repo_id="tester/locked", folder_path=folder)  # no token anywhere
    assert err.value.response.status_code == 401
    assert "Invalid username or password." in str(err.value)

    with pytest.raises(HfHubHTTPError) as err:
        HfApi().create_repo("tester/other-repo")
    assert err.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_unknown").upload_folder(repo_id="tester/locked", folder_path=folder)
    assert err.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(err.value)

    assert list(local_hub.files("tester/locked")) == [".gitattributes"]


def test_push_to_another_namespace_is_403(two_user_hub: LocalHub) -> None:
    HfApi(token=OTHER_TOKEN).create_repo("other/theirs")
    tester = HfApi(token=TOKEN)

    with pytest.raises(HfHubHTTPError) as err:
        tester.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="other/theirs")
    assert err.value.response.status_code == 403
    assert "You don't have the rights to write to the model repo other/theirs" in str(err.value)

    with pytest.raises(HfHubHTTPError) as err:
        tester.create_repo("other/new")
    assert err.value.response.status_code == 403
    assert 'You don\'t have the rights to create a model under the namespace "other"' in str(err.value)

    assert two_user_hub.repo_ids() == ["other/theirs"]
    assert list(two_user_hub.files("other/theirs")) == [".gitattributes"]


def test_private_repo_needs_the_owner_token(two_user_hub: LocalHub) -> None:
    owner = HfApi(token=TOKEN)
    owner.create_repo("tester/secret", private=True)
    owner.upload_file(path_or_fileobj=b"hidden", path_in_repo="weights.bin", repo_id="tester/secret")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/secret", "weights.bin")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("tester/secret")
    with pytest.raises(RepositoryNotFoundError):
        model_info("tester/secret")
    with pytest.raises(RepositoryNotFoundError):
        model_info("tester/secret", token=OTHER_TOKEN)

    assert model_info("tester/secret", token=TOKEN).private is True
    assert Path(hf_hub_download("tester/secret", "weights.bin", token=TOKEN)).read_bytes() == b"hidden"


def test_unknown_routes_are_404_and_tokens_never_logged(local_hub: LocalHub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hub_stub")
    HfApi(token=TOKEN).create_repo("tester/logged")

    response = get_session().get(
        f"{local_hub.endpoint}/api/spaces/tester/logged", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 404
    assert "no route for GET /api/spaces/tester/logged" in response.json()["error"]
    assert local_hub.unknown_routes == ["GET /api/spaces/tester/logged"]

    assert ("POST", "/api/repos/create", 200) in local_hub.requests
    assert TOKEN not in caplog.text
    assert all(TOKEN not in " ".join(map(str, entry)) for entry in local_hub.requests)


# Importing torch + peft (+ transformers, bitsandbytes) alone takes ~5 s, over this file's time budget: opt-in.
@pytest.mark.slow
def test_peft_from_pretrained_downloads_from_the_stub(local_hub: LocalHub, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    trained = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    api = HfApi(token=TOKEN)
    api.create_repo("tester/tiny-lora")
    api.upload_folder(repo_id="tester/tiny-lora", folder_path=tmp_path / "adapter")

    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Tiny(), "tester/tiny-lora")
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), trained(x))
    assert ("GET", "/tester/tiny-lora/resolve/main/adapter_model.safetensors", 200) in local_hub.requests
