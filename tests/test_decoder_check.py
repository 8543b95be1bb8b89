"""The decoder-check benchmark's plan, its finetune.py command line and its report, without the real model.

The benchmark itself (SmolLM2-135M, ~45 min) is not run here: `python -m benchmarks.decoder_check --smoke` is its
pipeline check. These tests cover what it decides: which runs, with which recipe flags, and how records aggregate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import load_example

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the repository, not of the wheel
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks import decoder_check  # noqa: E402
from flexlora_hf import FlexLoRAConfig  # noqa: E402


def test_plan_interleaves_methods_and_scores_the_base_once():
    runs = decoder_check.planned_runs([0, 1, 2], decoder_check.DEFAULT_METHODS)
    keys = [decoder_check.run_key(r["method"], r["seed"]) for r in runs]
    assert keys[-1] == "base" and keys.count("base") == 1 and len(set(keys)) == 7
    for wave in (runs[0:2], runs[2:4], runs[4:6]):  # two workers: each wave trains both methods on one seed
        assert {r["method"] for r in wave} == {"flexlora", "lora"} and len({r["seed"] for r in wave}) == 1


def test_run_keys_round_trip():
    for method in decoder_check.METHODS:
        assert decoder_check.parse_run_key(decoder_check.run_key(method, 3)) == {"method": method, "seed": 3}
    assert decoder_check.parse_run_key("base") == {"method": "base", "seed": None}
    for key in ("adalora-s1", "flexlora_grad-s0"):  # flexlora_grad: records only (init_from_gradient was removed)
        with pytest.raises(ValueError, match="expected 'base'"):
            decoder_check.parse_run_key(key)


def test_args_defaults_smoke_and_worker_flags(tmp_path):
    args, flags = decoder_check.parse_args([])
    assert args.settings == decoder_check.Settings() and args.seeds == [0, 1, 2] and args.jobs == 2
    assert args.runs_file == decoder_check.DEFAULT_RUNS and args.settings.n_train == 200 * 4 + 16
    assert args.settings.task == "intent_recognition" and args.settings.lr == 2e-3
    smoke, smoke_flags = decoder_check.parse_args(["--smoke", "--eval-limit", "4"])
    assert (smoke.settings.steps, smoke.settings.eval_limit, smoke.seeds, smoke.jobs) == (3, 4, [0], 1)
    assert smoke.runs_file.parent == decoder_check.SMOKE_DIR
    worker, _ = decoder_check.parse_args([*smoke_flags, "--worker", "lora:0"])
    assert worker.settings == smoke.settings and worker.work_dir == smoke.work_dir  # the worker sees the same run


def test_only_the_default_check_writes_the_committed_aggregate(tmp_path):
    default, _ = decoder_check.parse_args([])
    assert default.report_file == decoder_check.DEFAULT_REPORT
    for same in ("--svd_prune true --grace_events 1", "--lam_lr_rule constant --lam_lr_ratio 1 --init_basis lora_like"):
        assert decoder_check.parse_args(["--flexlora-flags", same])[0].report_file == decoder_check.DEFAULT_REPORT
    variant_flags = ["--flexlora-flags", "--orth_reg_weight 0", "--work-dir", str(tmp_path)]
    variant, _ = decoder_check.parse_args(variant_flags)
    assert variant.report_file == tmp_path / "report.json"  # a variant never overwrites the default's figures
    steps, _ = decoder_check.parse_args(["--steps", "300", "--work-dir", str(tmp_path)])
    assert steps.report_file == tmp_path / "report.json"
    named, _ = decoder_check.parse_args([*variant_flags, "--report-file", str(tmp_path / "v.json")])
    assert named.report_file == tmp_path / "v.json"


@pytest.mark.parametrize("method", ["flexlora", "lora", "flexlora_fixed"])
def test_finetune_argv_is_the_recipe_at_equal_budget(method, tmp_path):
    finetune = load_example("commonsense/finetune")
    settings = decoder_check.Settings(task="social_iqa", steps=60, batch_size=8, lr=1e-3)  # the first check's
    argv = decoder_check.finetune_argv(settings, method, 1, "base", tmp_path / "d.json", tmp_path / "out")
    model_args, data_args, flex_args, training_args = finetune.parse_args(argv)
    assert model_args.load_in_4bit and model_args.baseline == ("lora" if method == "lora" else "none")
    assert (data_args.cutoff_len, data_args.val_set_size) == (160, 16)
    assert (training_args.max_steps, training_args.per_device_train_batch_size) == (60, 8)
    assert (training_args.learning_rate, training_args.warmup_steps, training_args.seed) == (1e-3, 6, 1)
    assert training_args.data_seed == 1
    config = flex_args.to_flexlora_config(seed=training_args.seed)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    b0 = 0 if method == "flexlora_fixed" else 4
    assert (config.b0, config.t_warmup, config.t_final, config.delta_t) == (b0, 12, 12, 3)
    assert config == dataclasses.replace(  # every other field at the library default
        FlexLoRAConfig(), r=8, lora_alpha=16, lora_dropout=0.05, target_modules=config.target_modules, b0=b0,
        t_warmup=12, t_final=12, delta_t=3, seed=1,
    )
    dataclasses.replace(config, total_steps=60).validate()


def _record(method: str, seed: int | None, recipe: float, natural: float, settings) -> dict:
    scores = {
        task: {"acc": value, "acc_norm": value, "acc_stderr": 0.03, "acc_norm_stderr": 0.03, "n": 200}
        for task, value in zip(settings.eval_tasks, (recipe, natural), strict=True)
    }
    record = decoder_check.new_record(method, seed, settings) | {"scores": scores}
    if method != "base":
        ranks = {"events": 8, "total_rank": 1200, "min": 5, "max": 12} if method == "flexlora" else None
        record["training"] = {"train_loss": 0.5, "eval_loss": 0.2, "ranks": ranks}
        record["train_s_per_step"] = 10.0
    return record


def test_report_aggregates_only_runs_of_the_same_settings(tmp_path, capsys):
    settings = decoder_check.Settings(task="social_iqa")
    other = dataclasses.replace(settings, steps=3)
    rows = [
        _record("base", None, 0.35, 0.45, settings),
        *(_record("flexlora", s, 0.50 + s / 100, 0.45, settings) for s in (0, 1, 2)),
        *(_record("lora", s, 0.51, 0.46, settings) for s in (0, 1, 2)),
        *(_record("flexlora_fixed", s, 0.60, 0.40, settings) for s in (0, 1)),
        _record("flexlora", 0, 0.99, 0.99, other),  # a smoke-sized run in the same file: not counted
        _record("flexlora_grad", 0, 0.99, 0.99, settings),  # a removed method's record: history, not counted
    ]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    args, _ = decoder_check.parse_args(["--runs-file", str(runs), "--report-file", str(tmp_path / "r.json")])
    result = decoder_check.report(args, settings)
    recipe = result["scores"]["flexlora_bigbench_social_iqa_recipe"]["acc"]
    assert recipe["base"] == 0.35 and recipe["flexlora"]["per_seed"] == {0: 0.5, 1: 0.51, 2: 0.52}
    assert recipe["flexlora"]["stats"]["mean"] == pytest.approx(0.51)
    assert recipe["flexlora_wins"] == {"wins": 1, "ties": 1, "paired": 3}
    assert recipe["flexlora_fixed_wins"] == {"wins": 2, "ties": 0, "paired": 2}
    natural = result["scores"]["flexlora_bigbench_social_iqa"]["acc_norm"]
    assert natural["flexlora_wins"]["wins"] == 0 and natural["lora"]["stats"]["mean"] == pytest.approx(0.46)
    out = capsys.readouterr().out
    assert "| flexlora_bigbench_social_iqa_recipe | acc | 35.0 | 51.0 ± 1.0 (50.0, 51.0, 52.0) |" in out
    assert "| 60.0 ± 0.0 (60.0, 60.0) | 1/3 (1 tied) | 2/2 |" in out
    assert "1200 (5-12)" in out and "1200 (fixed)" in out
    assert json.loads((tmp_path / "r.json").read_text())["n_runs"] == 9


def test_one_base_evaluation_serves_every_training_setting_of_the_same_rows():
    settings = decoder_check.Settings()
    longer = dataclasses.replace(settings, steps=240, batch_size=4, lr=2e-3)
    base = _record("base", None, 0.35, 0.45, settings)
    trained = _record("lora", 0, 0.5, 0.5, settings)
    assert decoder_check.made_under(base, longer)  # the base does not see training settings
    assert not decoder_check.made_under(trained, longer)
    assert not decoder_check.made_under(base, dataclasses.replace(settings, eval_limit=100))  # other rows
    assert not decoder_check.made_under(base, dataclasses.replace(settings, task="multiemo"))
    assert decoder_check.made_under(trained, settings)


def test_flexlora_flags_reach_only_the_flexlora_methods(tmp_path):
    finetune = load_example("commonsense/finetune")
    args, flags = decoder_check.parse_args(["--flexlora-flags", "--orth_reg_weight 0"])
    settings = args.settings
    worker, _ = decoder_check.parse_args([*flags, "--worker", "flexlora:0"])
    assert worker.settings == settings  # the variant travels to the worker in one flag
    for method in ("flexlora", "flexlora_fixed"):
        argv = decoder_check.finetune_argv(settings, method, 0, "base", tmp_path / "d.json", tmp_path / "o")
        assert finetune.parse_args(argv)[2].to_flexlora_config().orth_reg_weight == 0
    assert "--orth_reg_weight" not in decoder_check.finetune_argv(settings, "lora", 0, "b", tmp_path / "d", tmp_path / "o")
    default = decoder_check.finetune_argv(decoder_check.Settings(), "flexlora", 0, "b", tmp_path / "d", tmp_path / "o")
    assert finetune.parse_args(default)[2].to_flexlora_config().orth_reg_weight == FlexLoRAConfig().orth_reg_weight
    lora = _record("lora", 0, 0.5, 0.5, decoder_check.Settings())
    assert decoder_check.made_under(lora, settings)  # LoRA never sees the flags: its runs serve every variant
    assert not decoder_check.made_under(lora, dataclasses.replace(settings, lr=4e-3))
    flex = _record("flexlora", 0, 0.5, 0.5, decoder_check.Settings())
    assert decoder_check.made_under(flex, decoder_check.Settings()) and not decoder_check.made_under(flex, settings)


def test_flags_normalise_to_one_key():
    key = decoder_check.normalize_flags
    settings = decoder_check.Settings
    # the v0.6 runs' flags, today's spelling of them and no flags at all: one run, the default check
    v06 = "--lam_lr_rule constant --lam_lr_ratio 1 --init_basis lora_like --svd_prune true --grace_events 1"
    assert settings(flexlora_flags=v06) == settings(flexlora_flags="--svd_prune true --grace_events 1") == settings()
    assert key("--lam_lr_ratio=1.0 --init_from_gradient false --adam_reset slot_age --min_rank 1") == ""
    assert key("--orth_reg_weight=0.0 --basis_lr_ratio 1") == key("--orth_reg_weight 0") == "--orth_reg_weight 0"
    assert key("--grace_events 0 --svd_prune false") == "--svd_prune false --grace_events 0"  # the config's order
    assert key("--svd_prune false --svd_prune true") == ""  # the last occurrence counts, as in argparse
    # over the check's own recipe: its lora_dropout 0.05 is no variant, the library default 0.0 is one
    assert settings(flexlora_flags="--lora_dropout 0.05") == settings()
    assert settings(flexlora_flags="--lora_dropout 0").flexlora_flags == "--lora_dropout 0"


@pytest.mark.parametrize(
    ("flags", "field"),
    [("--lam_lr_ratio 10", "lam_lr_ratio"), ("--lam_lr_rule lora_matched", "lam_lr_rule"),
     ("--basis_lr_ratio 2", "basis_lr_ratio"), ("--init_from_gradient", "init_from_gradient"),
     ("--adam_reset=shared_step", "adam_reset"), ("--svd_prune true --lam_lr_ratio 1 --lam_lr_ratio 3", "lam_lr_ratio")],
)
def test_a_removed_flag_off_its_kept_value_is_an_error(flags, field, capsys):
    with pytest.raises(ValueError, match=f"no longer has '{field}'"):
        decoder_check.Settings(flexlora_flags=flags)
    with pytest.raises(SystemExit):
        decoder_check.parse_args([f"--flexlora-flags={flags}"])  # one token: the = form
    assert field in capsys.readouterr().err
    with pytest.raises(ValueError, match="not FlexLoRA flags"):
        decoder_check.Settings(flexlora_flags="--learning_rate 1e-3")


def _legacy(method: str, flags: str | None) -> dict:
    """A record as the check wrote it before `flags_base` (its flags after LEGACY_FLAGS_BASE)."""
    record = _record(method, 0, 0.5, 0.5, decoder_check.Settings())
    del record["flags_base"]
    if flags is None:
        del record["settings"]["flexlora_flags"]  # written before the field existed: v0.2's λ at 10x
    else:
        record["settings"]["flexlora_flags"] = flags
    return record


def test_old_records_count_only_where_todays_flags_make_the_same_run():
    default = decoder_check.Settings()
    v06 = _legacy("flexlora", "--lam_lr_rule constant --lam_lr_ratio 1 --init_basis lora_like --svd_prune true --grace_events 1")
    assert decoder_check.record_flags(v06, default) == "" and decoder_check.made_under(v06, default)
    assert not decoder_check.made_under(v06, decoder_check.Settings(flexlora_flags="--svd_prune false"))
    history = [
        _legacy("flexlora", None),  # λ at a constant 10x (v0.2)
        _legacy("flexlora", "--lam_lr_rule constant --lam_lr_ratio 1 --init_basis lora_like"),  # v0.5: before v0.6's prune
        _legacy("flexlora", "--lam_lr_rule lora_matched --lam_lr_ratio 1 --svd_prune true"),  # a removed rule
        _legacy("flexlora_fixed", "--lam_lr_rule lora_matched --lam_lr_ratio 1"),
        _legacy("flexlora_grad", None),
    ]
    for record in history:
        assert decoder_check.record_flags(record, default) is None
        assert not decoder_check.made_under(record, default)
        assert not decoder_check.made_under(record, decoder_check.Settings(flexlora_flags="--svd_prune false --grace_events 0"))
    assert decoder_check.made_under(_legacy("lora", None), default)  # LoRA and the base: no flags involved
    assert decoder_check.made_under(_legacy("base", None), default)


def test_the_committed_v06_records_resume_and_report_under_todays_flags(tmp_path):
    committed = json.loads((ROOT / "benchmarks/results/decoder_check_intent_v06.json").read_text())
    for flags in ([], ["--flexlora-flags", "--svd_prune true --grace_events 1"]):
        args, _ = decoder_check.parse_args([*flags, "--runs-file", str(ROOT / decoder_check.DEFAULT_RUNS),
                                            "--report-file", str(tmp_path / "r.json")])
        rows = decoder_check.load_runs(args.runs_file, args.settings)
        keys = sorted(decoder_check.run_key(r["method"], r["seed"]) for r in rows)
        assert keys == ["base", *(f"flexlora-s{s}" for s in range(5)), *(f"lora-s{s}" for s in range(5))]
        result = json.loads(json.dumps(decoder_check.report(args, args.settings)))
        assert result["scores"] == committed["scores"] and result["training"] == committed["training"]
