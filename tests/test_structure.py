"""The package's shape: one-way imports (no cycle), a core that imports torch only, a quiet import, the public API."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flexlora_hf"
CORE = (
    "config", "constants", "choices", "functional", "functional.scoring", "functional.spectrum", "functional.schedule",
    "functional.allocation", "adapter.targets", "adapter.directions", "adapter.layer", "adapter.merging",
    "adapter.events", "adapter.model", "optim.surgery", "optim.slot_age", "distributed.sharding",
)
# The storage side of io/: it sits below the model, the Hub and the card (which it reaches only lazily, if at all).
IO_STORAGE = ("io.atomic", "io.validation", "io.native", "io.peft_view", "io.history", "io.save")
HEAVY = ("transformers", "peft", "bitsandbytes", "lm_eval", "matplotlib", "datasets", "huggingface_hub", "sklearn", "scipy")


def _path(name: str) -> Path:
    """The file of a dotted module name under the package (a package's __init__.py)."""
    base = PACKAGE.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _internal_imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every `flexlora_hf.*` module imported in `path` (function-level imports too, unless `top_level_only`), except
    under `if TYPE_CHECKING:`, resolved to module names that exist."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("flexlora_hf"):
                for alias in node.names:  # `from . import evaluation` names a module
                    sub = f"{target}.{alias.name}"
                    found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flexlora_hf"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(here)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name == "flexlora_hf":  # the lazy public API points at everything by design (PEP 562, resolved on use)
            continue
        graph[name] = {m for m in _internal_imports(path) if m != "flexlora_hf"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph()
    assert "flexlora_hf.adapter.model" in graph and graph["flexlora_hf.adapter.model"], "the scan found no imports: it is broken"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_only_the_core_at_module_level() -> None:
    # The model's convenience methods (save_pretrained / from_pretrained / push_to_hub) import the I/O and Hub
    # layers where they are used; nothing above the core is imported when the core loads.
    core = {f"flexlora_hf.{n}" for n in CORE} | {"flexlora_hf.adapter.quantization"}
    for name in CORE:
        imported = _internal_imports(_path(name), top_level_only=True)
        assert imported <= core, f"flexlora_hf.{name} imports {imported - core} at module level"
    lazy = import_graph()["flexlora_hf.adapter.model"] - core
    assert lazy == {"flexlora_hf.io.hub", "flexlora_hf.io.native", "flexlora_hf.io.save", "flexlora_hf.io.transfer"}, lazy


def test_nothing_above_the_core_is_imported_by_the_io_layer_at_runtime() -> None:
    graph = import_graph()
    above = {"flexlora_hf.adapter.model", "flexlora_hf.integrations.trainer"}
    for name, imported in graph.items():
        if name.startswith("flexlora_hf.io"):
            assert not imported & above, (name, imported)
    for name in IO_STORAGE:
        assert not graph[f"flexlora_hf.{name}"] & {"flexlora_hf.io.hub", "flexlora_hf.io.transfer"}, name


def test_every_module_lives_in_its_layer() -> None:
    """The top level holds only the package's face, config and shared constants; everything else is in a layer."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "_compat", "_logging", "choices", "config", "constants"], top
    layers = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert layers == ["adapter", "data", "distributed", "functional", "integrations", "io", "optim", "templates"], layers


def test_old_module_paths_import_the_same_module_with_a_warning() -> None:
    code = (
        "import warnings, sys\n"
        "warnings.simplefilter('error', ImportWarning)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always', FutureWarning)\n"
        "    import flexlora_hf.optim_surgery as old\n"
        "    from flexlora_hf.tasks.utils import prepare_bigbench_eval_data\n"
        "import flexlora_hf.optim.surgery as new, flexlora_hf.integrations.tasks.utils as u\n"
        "assert old is new and old.__spec__.name == 'flexlora_hf.optim.surgery', old.__spec__\n"
        "assert sys.modules['flexlora_hf.tasks.utils'] is u\n"
        "assert prepare_bigbench_eval_data is u.prepare_bigbench_eval_data\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, FutureWarning)]\n"
        "assert any('flexlora_hf.optim.surgery' in m for m in msgs), msgs\n"
        "import flexlora_hf\n"
        "assert flexlora_hf.model is sys.modules['flexlora_hf.adapter.model']\n"
    )
    out = _fresh_python(code)
    assert out.returncode == 0, out.stderr


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_torch_only(name: str) -> None:
    out = _fresh_python(
        f"import sys, flexlora_hf.{name}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"flexlora_hf.{name} pulled in: {out.stdout.strip()}"


def test_import_prints_nothing_and_loads_nothing_heavy() -> None:
    out = _fresh_python(f"import sys, flexlora_hf; assert not [m for m in {HEAVY!r} + ('torch',) if m in sys.modules]")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_trainer_import_is_quiet_and_later_bitsandbytes_messages_pass() -> None:
    # peft imports bitsandbytes whenever installed; on AVX512-BF16 CPUs that import asks `kernels` for a Hub kernel.
    code = (
        "import flexlora_hf, logging; from flexlora_hf import FlexLoRATrainer; import peft, bitsandbytes; "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other message')"
    )
    out = _fresh_python(code)
    assert out.returncode == 0, out.stderr
    assert "kernels" not in out.stderr and out.stdout == ""
    assert "other message" in out.stderr  # only bitsandbytes' own import is muted, nothing after it


def test_quiet_import_mutes_only_the_import_of_that_module(tmp_path) -> None:
    # A real package standing in for bitsandbytes: it logs on its own logger and on a second one while importing.
    pkg = tmp_path / "noisy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import logging\n"
        "from . import sub\n"
        "logging.getLogger('noisy_pkg.sub').warning('import-time chatter')\n"
        "logging.getLogger('helper_lib').warning('helper chatter')\n"
    )
    (pkg / "sub.py").write_text("VALUE = 1\n")
    (pkg / "data.txt").write_text("resource")
    code = (
        "import sys, logging, importlib.resources; sys.path.insert(0, sys.argv[1]);"
        "from flexlora_hf._logging import quiet_import;"
        "assert quiet_import('noisy_pkg', ('noisy_pkg', 'helper_lib'));"
        "import noisy_pkg;"
        "assert noisy_pkg.sub.VALUE == 1;"
        "assert importlib.resources.files('noisy_pkg').joinpath('data.txt').read_text() == 'resource';"
        "assert not quiet_import('noisy_pkg', ('noisy_pkg',));"  # already imported: nothing to do
        "logging.getLogger('noisy_pkg.sub').warning('later message');"
        "logging.getLogger('helper_lib').warning('later helper')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "chatter" not in out.stderr
    assert "later message" in out.stderr and "later helper" in out.stderr


def test_every_public_name_imports() -> None:
    import flexlora_hf

    for name in [*flexlora_hf.__all__, "FlexLoRASFTTrainer", "evaluate_adapter"]:
        assert getattr(flexlora_hf, name) is not None, name
    assert flexlora_hf.__version__
    assert len(flexlora_hf.__all__) <= 12  # what a LoRA user reads in a minute; the math is in flexlora_hf.functional


def test_deprecated_top_level_names_warn_and_name_their_new_home() -> None:
    import flexlora_hf
    from flexlora_hf import functional
    from flexlora_hf.io.save import save_flexlora

    with pytest.warns(FutureWarning, match=r"from flexlora_hf\.functional import spectral_entropy"):
        assert flexlora_hf.spectral_entropy is functional.spectral_entropy
    with pytest.warns(FutureWarning, match=r"from flexlora_hf\.io\.save import save_flexlora"):
        from flexlora_hf import save_flexlora as old
    assert old is save_flexlora
    with pytest.warns(FutureWarning):  # not cached: every use says so
        assert flexlora_hf.spectral_entropy is functional.spectral_entropy
    assert "spectral_entropy" not in dir(flexlora_hf) and "spectral_entropy" not in flexlora_hf.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = flexlora_hf.nope


def test_functional_holds_the_pure_math_only() -> None:
    from flexlora_hf import functional

    for name in functional.__all__:
        value = getattr(functional, name)
        assert value.__module__.rsplit(".", 1)[-1] in ("spectrum", "scoring", "schedule", "allocation"), name


def test_every_export_is_what_it_names_even_after_every_submodule_is_imported() -> None:
    # A submodule named like an exported function (e.g. `importance`) would replace it once imported.
    import inspect
    import pkgutil

    import flexlora_hf

    for info in pkgutil.walk_packages(flexlora_hf.__path__, "flexlora_hf."):
        if not info.name.startswith(("flexlora_hf.integrations.tasks", "flexlora_hf.data")):
            importlib.import_module(info.name)
    for name in [*flexlora_hf.__all__, *flexlora_hf._OPTIONAL]:
        value = getattr(flexlora_hf, name)
        assert not inspect.ismodule(value), f"flexlora_hf.{name} is a module"
        assert inspect.isclass(value) or inspect.isfunction(value), (name, type(value))
        assert value.__name__ == name, (name, value.__name__)


def test_no_package_module_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_module_opens_with_a_docstring() -> None:
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


@pytest.mark.parametrize(
    "script",
    ["run_glue.py", "run_clm.py", "run_image_classification.py", "commonsense/finetune.py", "accelerate_loop.py"],
)
def test_example_scripts_print_no_install_hint(script: str) -> None:
    path = PACKAGE.parent / "examples" / script
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install kernels" not in out.stdout + out.stderr


def test_no_release_history_or_measurements_in_package_strings() -> None:
    # Help strings, log messages and docstrings describe behaviour; history lives in CHANGELOG.md and figures in the
    # generated docs and result records (a copied figure goes stale the day it is re-measured).
    history = re.compile(r"\bv\d+\.\d+\b(?!\.\d)")  # "v0.5" (a release), not a version string like "1.2.3"
    measured = re.compile(r"\b\d{1,2}\.\d ?(?:±|vs)\s?\d")  # "89.5 ± 4.0", "70.9 vs 88.9"
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "tasks" in path.parts or "data" in path.parts:  # task prompts and example data carry their own text
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and (history.search(node.value) or measured.search(node.value))
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)
