"""Old module paths that still import for one release: `flexlora_hf.layer` is `flexlora_hf.adapter.layer`, and so on.

The flat modules moved into `functional/`, `adapter/`, `optim/`, `distributed/`, `io/` and `integrations/`. A
meta-path finder placed first answers the old dotted names (and anything below them, e.g.
`flexlora_hf.tasks.utils`) with the module object of the new home, so both names share one module (one set of
globals, one registry entry for lm-eval), and a `FutureWarning` names the new path once per old name. Imports
nothing of the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

PACKAGE = "flexlora_hf"

MOVED_MODULES: dict[str, str] = {  # old name under flexlora_hf -> new name under flexlora_hf
    "spectrum": "functional.spectrum",
    "scoring": "functional.scoring",
    "schedule": "functional.schedule",
    "allocation": "functional.allocation",
    "layer": "adapter.layer",
    "directions": "adapter.directions",
    "targets": "adapter.targets",
    "merging": "adapter.merging",
    "model": "adapter.model",
    "events": "adapter.events",
    "quantization": "adapter.quantization",
    "optim_surgery": "optim.surgery",
    "slot_age": "optim.slot_age",
    "sharding": "distributed.sharding",
    "hub": "io.hub",
    "transfer": "io.transfer",
    "warm_start": "io.warm_start",
    "model_card": "io.model_card",
    "plotting": "io.plotting",
    "trainer": "integrations.trainer",
    "trainer_card": "integrations.trainer_card",
    "trainer_restart": "integrations.trainer_restart",
    "arguments": "integrations.arguments",
    "evaluation": "integrations.evaluation",
    "cli": "integrations.cli",
    "tasks": "integrations.tasks",
}


def new_name(fullname: str) -> str | None:
    """The module an old dotted name now lives at, or None if the name did not move."""
    if not fullname.startswith(PACKAGE + "."):
        return None
    head, _, tail = fullname[len(PACKAGE) + 1 :].partition(".")
    if head not in MOVED_MODULES:
        return None
    return f"{PACKAGE}.{MOVED_MODULES[head]}" + (f".{tail}" if tail else "")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve an old module path to the module at its new home (the same object, never a second copy)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.specs: dict[str, importlib.machinery.ModuleSpec | None] = {}  # real name -> real spec

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        target_name = new_name(spec.name)
        assert target_name is not None
        if spec.name not in self.warned:
            self.warned.add(spec.name)
            warnings.warn(
                f"`{spec.name}` moved to `{target_name}`; the old path works for this release only.",
                FutureWarning,
                stacklevel=2,
            )
        module = importlib.import_module(target_name)
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its new name. importlib keeps the __name__ and __package__ of a module it is handed
        # but always sets __spec__ to the alias spec: restore the real one (relative imports, pickling and lm-eval
        # read it).
        module.__spec__ = self.specs[module.__name__]


_FINDER = _MovedModuleFinder()


def install_module_aliases() -> None:
    """Put the finder first on `sys.meta_path` (first, so a submodule of an old package path is never loaded twice
    by the path finder under the old name). Idempotent."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def moved_module(name: str) -> ModuleType | None:
    """`flexlora_hf.<name>` for an old top-level module name, through the finder (it warns); None otherwise."""
    if name not in MOVED_MODULES:
        return None
    return importlib.import_module(f"{PACKAGE}.{name}")
