"""Crash-safe file writes: every file is written to a temporary name and moved into place with `os.replace`.

An interrupted save therefore never leaves a half-written file under a final name. Used by the saver, the rank
history writer and the Trainer's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, fsync it, then `os.replace` it onto `path`."""
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, data: Any) -> None:
    """Write `data` as indented UTF-8 JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")

    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    """Write `text` as UTF-8, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
