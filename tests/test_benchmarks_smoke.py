"""Smoke tests for the benchmarks package: the quick cost benchmark on the tiny model and the quality run plan.

No timing is asserted (CI machines are noisy); we check that the benchmark runs end to end in a few seconds, that
every method is stepped, that FlexLoRA's reallocation events and AdaLoRA's allocation happen inside the timed
window, and that the JSON record has the keys `docs/benchmarks.md` reads.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the repository, not of the wheel
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SUMMARY_KEYS = {"median", "q25", "q75", "n"}


@pytest.fixture(scope="module")
def cost_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from benchmarks import cost

    out = tmp_path_factory.mktemp("cost") / "cost.json"
    argv = [
        "--model", "tiny", "--repeats", "2", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--seq-len", "16",
        "--memory", "inprocess", "--device", "cpu", "--output", str(out),
    ]  # fmt: skip
    result = cost.run(argv)
    result["_output"] = str(out)
    return result


def test_cost_tiny_reports_every_method(cost_result: dict) -> None:
    timing = cost_result["timing"]
    assert set(timing) == {"lora", "flexlora", "adalora"}
    for method, entry in timing.items():
        for key in ("step_s", "cpu_s", "alloc_s", "alloc_cpu_s", "step_s_ratio_to_lora", "cpu_s_ratio_to_lora"):
            assert set(entry[key]) >= SUMMARY_KEYS, (method, key)
            assert entry[key]["n"] == 2
        assert entry["step_s"]["median"] > 0
        assert entry["params"]["active"] > 0
    assert timing["lora"]["step_s_ratio_to_lora"]["median"] == pytest.approx(1.0)


def test_cost_tiny_events_are_inside_the_timed_window(cost_result: dict) -> None:
    flex = cost_result["timing"]["flexlora"]
    assert flex["events"] == 2  # one per timed step (repeats x steps), none during warm-up
    assert flex["final_total_rank"] == 8 * 10  # bidirectional events conserve the total rank (2 layers x 5 targets)
    assert flex["alloc_s"]["median"] > 0
    assert cost_result["timing"]["adalora"]["alloc_s"]["median"] > 0
    assert cost_result["timing"]["lora"]["alloc_s"]["median"] == 0


def test_cost_tiny_memory_and_output(cost_result: dict) -> None:
    memory = cost_result["memory"]
    assert set(memory) == {"lora", "flexlora", "adalora"}
    for entry in memory.values():
        assert {"kind", "peak_mib", "start_mib", "delta_mib", "delta_ratio_to_lora", "peak_ratio_to_lora"} <= set(entry)
    on_disk = json.loads(Path(cost_result["_output"]).read_text())
    assert on_disk["timing"].keys() == cost_result["timing"].keys()
    assert on_disk["adapter_spec"]["adalora_init_r"] == 8
    from benchmarks.cost import format_table

    assert format_table(cost_result).count("\n") == 4  # header, rule, three methods


def test_quality_plan_selection_then_tables() -> None:
    from benchmarks import quality

    args = quality.parse_args([])
    select = quality.selection_runs(args.tasks)
    # 3 tasks x 3 methods x 4 rates
    assert len(select) == 3 * 3 * 4 and len({quality.run_key(r) for r in select}) == len(select)
    # fake selection results: LoRA best at 1e-3, FlexLoRA at 2e-3, AdaLoRA at 5e-3 on every task
    best = {"lora": 1e-3, "flexlora": 2e-3, "adalora": 5e-3}
    rows = [
        {**r, "accuracy": 0.9 if float(quality.parse_method(r["method"])[1]["lr"]) == best[r["method"].split(":")[0]] else 0.5}
        for r in select
    ]
    assert quality.selected_lr(rows, "multiemo", "flexlora") == 2e-3
    assert quality.selected_lr(rows[:-1], args.tasks[-1], "flexlora") is None  # incomplete grid: no choice yet
    tables = quality.unique(quality.table_runs(rows, args.tasks, args.seeds))
    parts = [r["part"] for r in tables]
    assert parts.index("ablation") > parts.index("dropin") and parts[0] == "dropin"  # drop-in first
    dropin = [r for r in tables if r["part"] == "dropin"]
    assert len(dropin) == 3 * 3 * 3 and all(r["method"].endswith("lr=0.001") for r in dropin)  # LoRA's rate
    tuned = [r for r in tables if r["part"] == "tuned"]
    assert {r["method"] for r in tuned} == {"adalora:lr=0.005", "flexlora:lr=0.002"}  # LoRA's tuned = its drop-in
    ablations = [r for r in tables if r["part"] == "ablation"]
    on_cheapest = [r for r in ablations if r["task"] == quality.ABLATION_TASK]
    on_dropin = [r for r in ablations if r["task"] == quality.DROPIN_ABLATION_TASK]
    assert len(on_cheapest) == len(quality.ABLATIONS) * quality.ABLATION_SEEDS
    assert len(on_dropin) == len(quality.OUR_DEFAULTS_OFF) * quality.ABLATION_SEEDS  # our defaults, LoRA's rate
    assert len(ablations) == len(on_cheapest) + len(on_dropin)
    assert quality.parse_method("flexlora:importance=nuclear,lr=0.01") == (
        "flexlora",
        {"importance": "nuclear", "lr": 0.01},
    )
    assert quality.parse_method("lora") == ("lora", {})
    assert quality.schedule(200) == {"t_warmup": 40, "t_final": 40, "delta_t": 10}


def test_quality_specs_keep_their_records_and_refuse_what_cannot_run() -> None:
    from benchmarks import quality

    # the controls' specs name a removed switch at the behaviour kept: dropped, so they build today's config ...
    spec = "flexlora:init_basis=lora_like,lam_lr_ratio=1,importance=random,lr=0.001"
    assert quality.flexlora_overrides(spec) == {"init_basis": "lora_like", "importance": "random"}
    controls = quality.load_runs(ROOT / "benchmarks/results/controls_runs.jsonl")
    for method in {r["method"] for r in controls}:  # ... and resume their records (the same run both ways)
        quality.check_same_meaning(controls, {"task": "multiemo", "method": method, "seed": 3})
    with pytest.raises(ValueError, match="no longer has 'adam_reset'"):
        quality.flexlora_overrides("flexlora:adam_reset=shared_step,lr=0.001")
    with pytest.raises(SystemExit):
        quality.parse_args(["--custom", "flexlora:lam_lr_ratio=3,lr=0.001"])
    # ablations of folded switches are records only, never planned
    assert quality.RETIRED_ABLATIONS == ("lam_lr_ratio=1", "adam_reset=shared_step", quality.PAPER)
    assert not set(quality.RETIRED_ABLATIONS) & set(quality.ABLATIONS + quality.OUR_DEFAULTS_OFF)
    # in the v0.2 study's records `flexlora:lr=0.001` had λ at 10x: today's spec is another run, not resumed there
    study = quality.load_runs(ROOT / "benchmarks/results/quality_runs.jsonl")
    with pytest.raises(ValueError, match="history"):
        quality.check_same_meaning(study, {"task": "multiemo", "method": "flexlora:lr=0.001", "seed": 3})
    mine = [{**r, "spec_base": quality.SPEC_BASE} for r in study]  # the same keys written since: resumable
    quality.check_same_meaning(mine, {"task": "multiemo", "method": "flexlora:lr=0.001", "seed": 3})
    quality.check_same_meaning(study, {"task": "winowhy", "method": "flexlora:lr=0.001", "seed": 3})  # no old runs there


@pytest.mark.parametrize(
    ("runs", "report", "tasks"),
    [("quality_runs.jsonl", "quality.json", []), ("controls_runs.jsonl", "controls.json", ["--tasks", "multiemo", "intent_recognition"])],
)
def test_quality_reports_still_render_from_the_committed_records(runs, report, tasks, tmp_path: Path) -> None:
    from benchmarks import quality

    results = ROOT / "benchmarks" / "results"
    args = quality.parse_args(["--runs-file", str(results / runs), "--report-file", str(tmp_path / "r.json"), *tasks])
    committed = json.loads((results / report).read_text())
    assert quality.report(args)["markdown"] == committed["markdown"]  # retired ablations included


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    """The GPU check's --device cpu smoke run: every part runs and writes its JSON and the summary."""
    from benchmarks import gpu_check

    assert gpu_check.main([str(tmp_path), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert set(results) == {"cost", "event", "split", "4bit"}
    assert results["split"]["ok"] and results["split"]["events"] == 4
    assert results["4bit"].get("ok") or "skipped" in results["4bit"]
    assert "## cost" in (tmp_path / "summary.md").read_text()


def test_delta_norms_equal_peft_delta_weight(tmp_path: Path) -> None:
    """The ||ΔW|| diagnostic reads a PEFT folder (with per-module rank/alpha patterns) exactly as PEFT scales it."""
    import peft
    import torch
    from torch import nn

    from benchmarks.delta_norms import delta_norms, main

    torch.manual_seed(0)
    base = nn.Sequential(nn.Sequential(nn.Linear(12, 20)), nn.Sequential(nn.Linear(20, 6)))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0.0", "1.0"], rank_pattern={"1.0": 2},
                             alpha_pattern={"1.0": 3})
    model = peft.get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # a trained adapter: ΔW != 0
    model.save_pretrained(str(tmp_path / "a"))
    want = {str(i): float(model.base_model.model[i][0].get_delta_weight("default").norm()) for i in (0, 1)}
    got = delta_norms(tmp_path / "a")
    assert set(got) == {"0"} and got["0"]["n"] == 2  # both paths end in ".0": one type
    assert got["0"]["mean"] == pytest.approx((want["0"] + want["1"]) / 2, rel=1e-5)
    assert main([str(tmp_path / "a"), "--output", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text())[str(tmp_path / "a")] == got


def test_generated_doc_blocks_match_the_records() -> None:
    # README's headline table and every table of docs/benchmarks.md are rendered from benchmarks/results/; a record
    # changed without `python -m benchmarks.docs_report` (or a block edited by hand) fails here.
    from benchmarks.docs_report import main

    assert main(["--check"]) == 0


# A benchmark figure: a decimal ratio, share or time ("1.013x", "70.9 %", "5.3 ms"), a memory size, or a spread
# ("89.5 ± 4.0"). Not one: a version (v0.6), a rate (2e-3), a count of cores, steps or seeds.
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+ ?(?:x\b|×|%|ms\b|µs\b|s\b)|(?<![\w.])\d+(?:\.\d+)? ?(?:MiB|GiB)\b|±\s*\d")
# figures that are not measurements: design.md's Adam bias-correction factors, computed from β₂
NOT_MEASURED = {("docs/design.md", "1.35x"), ("docs/design.md", "3.16x")}
GENERATED = re.compile(r"<!-- generated: (\S+) -->.*?<!-- /generated: \1 -->", re.S)


def _prose(text: str) -> list[str]:
    """The lines outside generated blocks and code fences (those become blank lines, so line numbers hold)."""
    text = GENERATED.sub(lambda m: "\n" * m.group().count("\n"), text)
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    return text.splitlines()


def test_docs_restate_no_figure_outside_generated_blocks() -> None:
    """Figures are generated, never copied: with the generated blocks stripped, README.md and docs/*.md (not the
    research notes, which keep superseded figures as history) hold no benchmark figure, and every block they hold is
    one docs_report renders."""
    from benchmarks.docs_report import BLOCKS, main

    for figure in ("1.013x", "89.5 ± 4.0", "5.3 ms", "70.9 %", "3049 MiB", "0.0010 %"):
        assert FIGURE.search(f"a figure {figure} here"), figure
    for other in ("v0.6 x", "2 cores", "lr 2e-3", "200 steps", "5 seeds", "Δ_T = 1000", "r 8", "20 % of the steps"):
        assert not FIGURE.search(other), other
    found, unknown = [], []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        unknown += [f"{rel}:{name}" for name in re.findall(r"<!-- generated: (\S+) -->", text) if (rel, name) not in BLOCKS]
        for lineno, line in enumerate(_prose(text), 1):
            found += [f"{rel}:{lineno}: {m.group()!r} in {line.strip()!r}" for m in FIGURE.finditer(line)
                      if (rel, m.group()) not in NOT_MEASURED]
    assert not found, "figures outside generated blocks (render them in benchmarks/docs_report.py):\n" + "\n".join(found)
    assert not unknown, f"generated blocks docs_report does not render: {unknown}"
    assert main(["--check"]) == 0


# ---------------------------------------------------------------------------------------------------------- the runner
CONTROLS_SPECS = [
    "flexlora:init_basis=lora_like,lam_lr_ratio=1,lr=0.001",
    "flexlora:init_basis=lora_like,lam_lr_ratio=1,b0=0,lr=0.001",
    "flexlora:init_basis=lora_like,lam_lr_ratio=1,importance=random,lr=0.001",
    "lora:lr=0.001",
    "adalora:lr=0.001",
]


def test_every_study_spec_parses_and_names_what_exists(tmp_path: Path) -> None:
    import importlib
    import inspect

    from benchmarks import run
    from benchmarks.docs_report import BLOCKS

    studies = run.studies()
    assert {"controls", "decoder_check", "event_cost"} <= set(studies)
    for name, study in studies.items():
        module = importlib.import_module(study.harness)
        assert inspect.signature(module.main).parameters, name  # called in-process with its argv
        assert study.description and study.records, name
        for rel in study.records + study.reports:
            assert (ROOT / rel).is_file(), (name, rel)
        for block in study.docs_blocks:
            assert tuple(block.split(":", 1)) in BLOCKS, (name, block)
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "benchmarks/studies/event_cost.toml").read_text() + "typo = 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        run.load_study(bad)


def _dry_run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    import shlex

    from benchmarks import run

    assert run.main([*argv, "--dry-run"]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_runner_dry_run_gives_each_harness_its_argv(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import decoder_check, event_cost, quality

    [cmd] = _dry_run(["controls", "--seeds", "3", "4"], capsys)
    assert cmd[:3] == ["python", "-m", "benchmarks.quality"]
    args = quality.parse_args(cmd[3:])
    assert args.custom == CONTROLS_SPECS and args.seeds == [3, 4] and args.tasks == ["multiemo", "intent_recognition"] and args.threads == 1
    assert args.runs_file == Path("benchmarks/results/controls_runs.jsonl")
    assert args.report_file == Path("benchmarks/results/controls.json")
    [cmd] = _dry_run(["controls", "--shard", "1/2"], capsys)
    assert quality.parse_args(cmd[3:]).shard == "1/2" and quality.parse_args(cmd[3:]).seeds == [0, 1, 2, 3, 4]

    [cmd] = _dry_run(["decoder_check", "--seeds", "2", "3", "4"], capsys)
    assert cmd[:3] == ["python", "-m", "benchmarks.decoder_check"]
    args, _ = decoder_check.parse_args(cmd[3:])
    assert args.seeds == [2, 3, 4] and args.methods == ["flexlora", "lora"]
    assert args.settings == decoder_check.Settings()  # "--svd_prune true --grace_events 1": the default check
    assert args.work_dir == Path("outputs/decoder_v06")
    assert (args.runs_file, args.report_file) == (decoder_check.DEFAULT_RUNS, decoder_check.DEFAULT_REPORT)

    [cmd] = _dry_run(["event_cost"], capsys)
    args = event_cost.parse_args(cmd[3:])
    assert (args.threads, args.repeats, args.output) == (1, 10, "benchmarks/results/event_cost_v06.json")
    recorded = json.loads((ROOT / "benchmarks/results/event_cost_v06.json").read_text())["config"]
    assert vars(args) == recorded  # the arguments that made the committed record

    # --report: each study's report step (the controls' as the committed report was made), then docs_report
    cmds = _dry_run(["--report"], capsys)
    assert cmds[-1] == ["python", "-m", "benchmarks.docs_report"]
    [controls] = [c for c in cmds if c[2] == "benchmarks.quality" and "benchmarks/results/controls.json" in c]
    args = quality.parse_args(controls[3:])
    assert args.report and args.runs_file == Path("benchmarks/results/controls_runs.jsonl")


def test_runner_refuses_what_a_harness_cannot_take() -> None:
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.main(["decoder_check", "--shard", "0/2", "--dry-run"])  # runs its own --jobs workers
    with pytest.raises(SystemExit):
        run.main(["event_cost", "--seeds", "1", "--dry-run"])
    with pytest.raises(SystemExit):
        run.main(["no_such_study", "--dry-run"])


def test_provenance_names_version_commit_machine_and_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import flexlora_hf
    from benchmarks.common import provenance

    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "run.py"), "controls", "--seeds", "3", "4"])
    prov = provenance()
    assert set(prov) == {"flexlora_hf_version", "git_commit", "machine", "command"}
    assert prov["flexlora_hf_version"] == flexlora_hf.__version__
    assert isinstance(prov["git_commit"], str) and len(prov["git_commit"].removesuffix("+dirty")) == 40
    assert "torch" in prov["machine"]
    assert prov["command"] == "python -m benchmarks.run controls --seeds 3 4"
