"""Uploading FlexLoRA adapters to the Hugging Face Hub.

This module owns [`push_to_hub`]: it saves the adapter folder (both views, heatmap and model card, see
`serialization.py`) into a temporary directory and uploads it as one commit with `HfApi.upload_folder`. It does not
use transformers' `PushToHubMixin`, which replaces the model card with a generic `library_name: transformers` one.
The token is only handed to `HfApi`; it is never written to disk or logged. Downloading is `load_flexlora`'s job.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi

from .serialization import save_flexlora

if TYPE_CHECKING:
    from .model import FlexLoRAModel

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
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Save the adapter (native + PEFT views, rank heatmap, model card) and upload it to a Hub model repo.

    Args:
        model (`FlexLoRAModel`): the adapted model.
        repo_id (`str`): `"user/name"`; the repo is created if it does not exist.
        private (`bool`, *optional*): visibility of a newly created repo (the Hub default when `None`).
        token (`str`, *optional*): Hub token with write access; the locally stored token is used when `None`.
        commit_message (`str`, *optional*): defaults to `"Upload FlexLoRA adapter"`.
        revision (`str`, *optional*): branch to commit to (created from the default branch if missing).
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
        model_card_kwargs (`dict`, *optional*): keyword arguments for `build_model_card`; `repo_id` defaults to the
            target repo so the card's loading snippets name it.

    Returns:
        `str`: URL of the commit (of the pull request's commit with `create_pr=True`).

    Raises:
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request (no or invalid token, another user's
            namespace, ...); the message is the Hub's. Nothing local is modified: the folder is a temporary one.
    """
    card_kwargs = {"repo_id": repo_id, **dict(model_card_kwargs or {})}
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="flexlora_push_") as folder:
        # Save before touching the Hub: a model that cannot be saved must not leave an empty repo behind.
        save_flexlora(model, folder, model_card_kwargs=card_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main") and not create_pr:  # a commit needs an existing branch
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
