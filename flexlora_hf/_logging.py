"""Keeps bitsandbytes' import-time chatter out of our users' output, without importing anything.

Why: `import peft` (0.21+) imports bitsandbytes unconditionally whenever it is installed, and transformers' `Trainer`
imports peft, so every Trainer script imports bitsandbytes even when nothing is quantised. On CPUs with AVX512-BF16,
bitsandbytes' import then asks the `kernels` package (a transformers dependency) for a Hub kernel; offline that logs
two warnings ("Skipping publisher trust check ...", "Failed to load CPU gemm_4bit_forward ..."). Neither applies:
FlexLoRA's CPU guard (`quantization.guard_bnb_cpu`) keeps 4-bit layers off that kernel, and the lookup cannot work
offline. We cannot stop peft from importing bitsandbytes, so we scope the silence in *time*, not by message text:
while bitsandbytes' own import runs, the `bitsandbytes` and `kernels` loggers are raised to ERROR; afterwards their
levels are restored and every later message passes. Nothing is imported to do this: a one-shot import hook
(`sys.meta_path`) wraps the loader of the module when someone imports it. Set `FLEXLORA_HF_SHOW_BNB_HINT=1` to see
the messages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# module -> loggers muted while that module's import runs
QUIET_IMPORTS: dict[str, tuple[str, ...]] = {"bitsandbytes": ("bitsandbytes", "kernels")}


class _QuietLoader(importlib.abc.Loader):
    """Delegates to the real loader; only `exec_module` (the module body) runs with the loggers muted."""

    def __init__(self, loader: Any, loggers: Sequence[str]) -> None:
        self._loader = loader
        self._loggers = tuple(loggers)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module's real loader goes back before its body runs: importlib.resources and friends must see it.
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        saved = {name: logging.getLogger(name).level for name in self._loggers}
        for name in self._loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            self._loader.exec_module(module)
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _QuietImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of `module` it takes the real spec and wraps its loader, then
    removes itself from `sys.meta_path`."""

    def __init__(self, module: str, loggers: Sequence[str]) -> None:
        self.module = module
        self.loggers = tuple(loggers)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader, self.loggers)
        return spec


def quiet_import(module: str, loggers: Sequence[str]) -> bool:
    """Mute `loggers` below ERROR while `module`'s own import runs, whoever imports it later. Returns whether a
    hook was installed (not when the module is already imported, or one is already waiting for it)."""
    if module in sys.modules or any(
        isinstance(f, _QuietImportFinder) and f.module == module for f in sys.meta_path
    ):
        return False
    sys.meta_path.insert(0, _QuietImportFinder(module, loggers))
    return True


def silence_bitsandbytes_import() -> None:
    """Install the hooks of `QUIET_IMPORTS` (idempotent; imports nothing)."""
    if os.environ.get("FLEXLORA_HF_SHOW_BNB_HINT"):
        return
    for module, loggers in QUIET_IMPORTS.items():
        quiet_import(module, loggers)
