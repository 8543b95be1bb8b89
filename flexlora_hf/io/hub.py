"""All Hugging Face Hub traffic, both directions.

Upload: [`push_to_hub`] saves the adapter folder (both views, heatmap and model card, see `io/save.py`) into a
temporary directory and uploads it as one commit with `HfApi.upload_folder`. It does not use transformers'
`PushToHubMixin`, which replaces the model card with a generic `library_name: transformers` one.
Download: [`resolve_directory`] turns a local folder or a repo id into a local folder with the native files.
The token is only handed to `huggingface_hub`; it is never written to disk or logged. huggingface_hub is imported
where it is used.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..constants import FLEXLORA_CONFIG_NAME, NATIVE_FILES
from .peft_view import base_model_name_or_path, is_local_path
from .save import save_flexlora

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload FlexLoRA adapter"


def push_to_hub(
    model: FlexLoRAModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Save the adapter (native + PEFT views, rank heatmap, model card) and upload it to a Hub model repo.

    Args:
        model (`FlexLoRAModel`): the adapted model.
        repo_id (`str`): `"user/name"`; the repo is created if it does not exist.
        private (`bool`, *optional*): visibility of a newly created repo (the Hub default when `None`).
        token (`str`, *optional*): Hub token with write access; the locally stored token is used when `None`.
        commit_message (`str`, *optional*): defaults to `"Upload FlexLoRA adapter"`.
        revision (`str`, *optional*): branch to commit to; a missing branch is created from the head of the default
            branch first. `refs/pr/N` adds a commit to an open pull request.
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request (against the default branch)
            instead of committing.
        base_model (`str`, *optional*): Hub id of the base model (e.g. `"google/vit-base-patch16-224-in21k"`). It
            fills the card's `base_model` and the PEFT view's `base_model_name_or_path`. Pass it when the base model
            was loaded from a local folder: its config then only knows a path on this machine, which is useless to
            whoever reads the pushed card (a warning says so when it is missing).
        model_card_kwargs (`dict`, *optional*): keyword arguments for `build_model_card`; `repo_id` defaults to the
            target repo so the card's loading snippets name it.

    Returns:
        `str`: URL of the commit (of the pull request's commit with `create_pr=True`).

    Raises:
        ValueError: `base_model` is a local path, or disagrees with `model_card_kwargs["base_model"]`; or
            `create_pr=True` with a `revision` other than `main` (huggingface_hub opens pull requests against the
            default branch only).
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request (no or invalid token, another user's
            namespace, ...); the message is the Hub's. Nothing local is modified: the folder is a temporary one.
    """
    from huggingface_hub import HfApi

    if create_pr and revision not in (None, "main"):
        # Refused here, before the repo or a branch is created: huggingface_hub would refuse the upload afterwards.
        raise ValueError(
            f"push_to_hub: create_pr=True opens a pull request against the default branch, so revision={revision!r} "
            "cannot be used with it; push to the branch (revision=..., create_pr=False) or drop revision."
        )
    card_kwargs = {"repo_id": repo_id, **dict(model_card_kwargs or {})}
    base_model = _checked_base_model(model, base_model, card_kwargs.get("base_model"))
    if base_model is not None:
        card_kwargs["base_model"] = base_model
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="flexlora_push_") as folder:
        # Save before touching the Hub: a model that cannot be saved must not leave an empty repo behind.
        save_flexlora(model, folder, model_card_kwargs=card_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
            # A commit needs its branch to exist; exist_ok leaves an existing branch as it is.
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    logger.info("Pushed FlexLoRA adapter to %s: %s", repo_id, info.commit_url)
    return str(info.commit_url)


def _checked_base_model(model: FlexLoRAModel, base_model: str | None, card_base_model: Any) -> str | None:
    """The base model's Hub id for the pushed card and PEFT view; warns when the card would only know a local path."""
    if base_model is not None and card_base_model is not None and base_model != card_base_model:
        raise ValueError(
            f"push_to_hub: base_model={base_model!r} disagrees with model_card_kwargs['base_model']="
            f"{card_base_model!r}; pass the base model's Hub id once."
        )
    chosen = base_model if base_model is not None else card_base_model
    if chosen is not None:
        chosen = str(chosen)
        if is_local_path(chosen):
            raise ValueError(
                f"push_to_hub: base_model={chosen!r} is a local path; pass the base model's Hub id "
                "(e.g. 'google/vit-base-patch16-224-in21k') so readers of the card can load it."
            )
        return chosen
    name = base_model_name_or_path(model.get_base_model())
    if name is not None and is_local_path(name):
        logger.warning(
            "push_to_hub: the base model was loaded from a local folder (%s); the pushed card names no base model "
            "and adapter_config.json keeps that path. Pass base_model='<hub id of the base model>' to fix both.",
            name,
        )
    return None


def _looks_like_local_path(path: str) -> bool:
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.endswith(("/", os.sep))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
    )


def resolve_directory(
    path_or_repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    allow_patterns: Sequence[str] = NATIVE_FILES,
) -> str:
    """A local folder as is; otherwise download `allow_patterns` (default: the native files) of a Hub repo at
    `revision` (a branch, tag or commit; the default branch when `None`), with `token` for private repos."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id):
        raise NotADirectoryError(
            f"load_flexlora: {path_or_repo_id} is a file; pass the adapter folder (with {FLEXLORA_CONFIG_NAME}) or "
            "a Hub repo id."
        )
    if _looks_like_local_path(path_or_repo_id):
        raise FileNotFoundError(f"load_flexlora: no adapter folder at {path_or_repo_id}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return str(
            snapshot_download(
                repo_id=path_or_repo_id, revision=revision, token=token, allow_patterns=list(allow_patterns)
            )
        )
    except HFValidationError as err:
        raise ValueError(
            f"load_flexlora: {path_or_repo_id!r} is neither an existing folder nor a valid Hub repo id ({err})."
        ) from err
