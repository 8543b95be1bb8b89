"""The one runner of the benchmark studies: each study is a spec file, ``benchmarks/studies/<study>.toml``.

Usage (from the repository root)::

    python -m benchmarks.run --list                                  # the studies and what they write
    python -m benchmarks.run controls                                # run a study as its spec says (resumable)
    python -m benchmarks.run controls --seeds 3 4 --shard 0/2        # other seeds / one shard of the runs
    python -m benchmarks.run decoder_check --seeds 2 3 4 --dry-run   # print the harness command only
    python -m benchmarks.run decoder_check -- --jobs 1               # after --: more harness arguments
    python -m benchmarks.run --report                                # every study's report step, then docs_report

A spec names the harness module, what the study is, the argv it passes, the files it writes and the generated docs
blocks (`benchmarks.docs_report`) that read them:

* ``harness``: a module of this package with ``main(argv)`` (called in this process; a harness without one is run
  as ``python -m <harness>``); ``description``: what the study measures (no figures).
* ``argv``: the harness's arguments, without seeds and shard; ``seeds``: passed as ``--seeds`` (a study without
  seeds takes none); ``shard`` (default false): whether the harness takes ``--shard i/n``. ``--seeds`` and
  ``--shard`` on this command line replace the spec's; arguments after ``--`` are appended to the harness argv.
* ``report_argv``: the harness arguments that aggregate the records into the report (absent: the run writes its
  record itself); ``records``, ``reports``: the files the run and the report write; ``docs_blocks``: the
  ``FILE:NAME`` generated blocks that read them.

Every new record carries `benchmarks.common.provenance` (library version, git commit, machine, command).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "benchmarks" / "studies"
_LISTS = ("argv", "report_argv", "records", "reports", "docs_blocks")


@dataclasses.dataclass(frozen=True)
class Study:
    """One spec file, read."""

    name: str
    harness: str
    description: str
    argv: tuple[str, ...]
    seeds: tuple[int, ...] = ()
    shard: bool = False
    report_argv: tuple[str, ...] | None = None
    records: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()
    docs_blocks: tuple[str, ...] = ()

    def run_argv(self, seeds: Sequence[int] | None = None, shard: str | None = None) -> list[str]:
        """The harness argv of a run: the spec's, with `seeds` / `shard` in place of the spec's when given."""
        seeds = list(self.seeds if seeds is None else seeds)
        if seeds and not self.seeds:
            raise ValueError(f"study {self.name!r} takes no seeds ({self.harness} has no --seeds)")
        if shard is not None and not self.shard:
            raise ValueError(f"study {self.name!r} takes no --shard ({self.harness} schedules its runs itself)")
        argv = list(self.argv)
        if seeds:
            argv += ["--seeds", *(str(s) for s in seeds)]
        if shard is not None:
            argv += ["--shard", shard]
        return argv

    def command(self, argv: Sequence[str]) -> str:
        """The equivalent shell command (from the repository root)."""
        return shlex.join(["python", "-m", self.harness, *argv])


def load_study(path: Path) -> Study:
    """Read and check one spec file."""
    data: dict[str, Any] = tomllib.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Study)} - {"name"}
    unknown = set(data) - fields
    missing = {"harness", "description", "argv"} - set(data)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if not str(data["harness"]).startswith("benchmarks."):
        raise ValueError(f"{path}: harness {data['harness']!r} is not a module of the benchmarks package")
    for key in _LISTS:
        if key in data:
            data[key] = tuple(str(x) for x in data[key])
    data["seeds"] = tuple(int(s) for s in data.get("seeds", ()))
    data["description"] = " ".join(str(data["description"]).split())
    return Study(name=path.stem, **data)


def studies() -> dict[str, Study]:
    """Every spec under ``benchmarks/studies/``, by name."""
    return {p.stem: load_study(p) for p in sorted(STUDIES.glob("*.toml"))}


def call_harness(harness: str, argv: Sequence[str]) -> int:
    """``harness.main(argv)`` in this process, from the repository root (the specs' paths are relative to it); a
    harness whose ``main`` takes no argv runs as ``python -m harness``."""
    os.chdir(ROOT)
    module = importlib.import_module(harness)
    main = getattr(module, "main", None)
    if main is not None and inspect.signature(main).parameters:
        return int(main(list(argv)) or 0)
    return subprocess.run([sys.executable, "-m", harness, *argv], cwd=ROOT, check=False).returncode


def report_all(chosen: Sequence[Study], dry_run: bool) -> int:
    """Each study's report step, then `benchmarks.docs_report` (all generated blocks)."""
    status = 0
    for study in chosen:
        if study.report_argv is None:
            continue
        print(study.command(study.report_argv), flush=True)
        if not dry_run:
            status |= call_harness(study.harness, study.report_argv)
    print("python -m benchmarks.docs_report", flush=True)
    if not dry_run:
        status |= call_harness("benchmarks.docs_report", [])
    return status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("study", nargs="*", help="Study name(s): a run takes one; --report takes none (all) or several.")
    p.add_argument("--list", action="store_true", help="List the studies.")
    p.add_argument("--report", action="store_true", help="Run the report steps, then python -m benchmarks.docs_report.")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds instead of the spec's.")
    p.add_argument("--shard", default=None, metavar="I/N", help="Run shard I of N (harnesses that take --shard).")
    p.add_argument("--dry-run", action="store_true", help="Print the harness command(s), run nothing.")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1 :]
    known = studies()
    for name in args.study:
        if name not in known:
            p.error(f"unknown study {name!r}; choose from {', '.join(known)}")
    if args.list:
        for study in known.values():
            print(
                f"{study.name}: {study.harness}; writes {', '.join(study.records + study.reports)}; "
                f"read by {', '.join(study.docs_blocks) or 'no docs block'}\n    {study.description}"
            )
        return 0
    if args.report:
        if args.seeds or args.shard or extra:
            p.error("--report takes no --seeds, --shard or harness arguments (a report reads every record)")
        return report_all([known[n] for n in args.study] or list(known.values()), args.dry_run)
    if len(args.study) != 1:
        p.error("name one study to run (or --list, --report)")
    study = known[args.study[0]]
    try:
        harness_argv = study.run_argv(args.seeds, args.shard) + extra
    except ValueError as err:
        p.error(str(err))
    print(study.command(harness_argv), flush=True)
    return 0 if args.dry_run else call_harness(study.harness, harness_argv)


if __name__ == "__main__":
    raise SystemExit(main())
