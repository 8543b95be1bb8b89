"""`FlexLoRAConfig`: JSON round trip, command-line parsing, validation messages naming the field."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
from transformers import HfArgumentParser

from flexlora_hf.config import CONFIG_NAME, REMOVED_FIELDS, FlexLoRAConfig, parse_max_rank


def _custom() -> FlexLoRAConfig:
    return FlexLoRAConfig(
        r=6,
        lora_alpha=12.0,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        b0=3,
        t_warmup=10,
        t_final=20,
        delta_t=5,
        total_steps=100,
        orth_reg_weight=0.5,
        max_rank={"model.layers.0.self_attn.q_proj": 9},
        importance="mat_energy_entropy",
        allocation="prune_only",
        expansion_init="orthogonal",
        schedule="window",
        seed=7,
    )


def test_dict_round_trip() -> None:
    cfg = _custom()
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert FlexLoRAConfig.from_dict(data) == cfg
    assert FlexLoRAConfig.from_dict(FlexLoRAConfig().to_dict()) == FlexLoRAConfig()


def test_set_target_modules_serialised_sorted() -> None:
    cfg = FlexLoRAConfig(target_modules={"v_proj", "q_proj"})
    assert cfg.to_dict()["target_modules"] == ["q_proj", "v_proj"]


def test_save_and_load_pretrained(tmp_path) -> None:
    cfg = _custom()
    cfg.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / CONFIG_NAME
    assert path.is_file()
    assert json.loads(path.read_text())["importance"] == "mat_energy_entropy"
    assert FlexLoRAConfig.from_pretrained(tmp_path / "adapter") == cfg


def test_from_pretrained_ignores_private_keys(tmp_path) -> None:
    data = FlexLoRAConfig(r=2).to_dict()
    data["_flexlora_version"] = "0.1.0"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    assert FlexLoRAConfig.from_pretrained(tmp_path).r == 2


def test_from_pretrained_missing_dir(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        FlexLoRAConfig.from_pretrained(tmp_path)


def test_unknown_key_in_from_dict() -> None:
    data = FlexLoRAConfig().to_dict()
    data["rank"] = 4
    with pytest.raises(ValueError, match=r"Unknown FlexLoRAConfig field\(s\): rank\."):
        FlexLoRAConfig.from_dict(data)


def test_hf_argument_parser() -> None:
    parser = HfArgumentParser(FlexLoRAConfig)
    (cfg,) = parser.parse_args_into_dataclasses(
        ["--r", "4", "--b0", "2", "--importance", "nuclear", "--total_steps", "3000", "--lora_alpha", "8"]
    )
    assert isinstance(cfg, FlexLoRAConfig)
    assert cfg.r == 4 and cfg.b0 == 2 and cfg.importance == "nuclear"
    assert cfg.total_steps == 3000 and cfg.lora_alpha == 8.0
    assert cfg.t_warmup == 500  # defaults kept
    (default,) = parser.parse_args_into_dataclasses([])
    assert default == FlexLoRAConfig()


def test_hf_argument_parser_validates() -> None:
    parser = HfArgumentParser(FlexLoRAConfig)
    with pytest.raises(ValueError, match="importance"):
        parser.parse_args_into_dataclasses(["--importance", "gradient"])


def test_help_strings_present() -> None:
    import dataclasses

    for f in dataclasses.fields(FlexLoRAConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(t_warmup=500, t_final=500, total_steps=1000), "t_warmup"),
        (dict(t_warmup=600, t_final=500, total_steps=1000), "total_steps"),
        (dict(b0=-1), "b0"),
        (dict(r=0), "r"),
        (dict(r=8, max_rank=4), "max_rank"),
        (dict(r=8, max_rank={"a": 16, "b": 7}), "max_rank"),
        (dict(importance="gradient"), "importance"),
        (dict(allocation="greedy"), "allocation"),
        (dict(expansion_init="random"), "expansion_init"),
        (dict(schedule="cosine"), "schedule"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(delta_t=0), "delta_t"),
        (dict(t_final=-1), "t_final"),
        (dict(total_steps=0, t_warmup=0, t_final=0), "total_steps"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"(?<![A-Za-z_]){field}(?![A-Za-z_])"):
        FlexLoRAConfig(**kwargs)


def test_window_boundary_is_valid() -> None:
    FlexLoRAConfig(t_warmup=500, t_final=499, total_steps=1000)  # one step of window is enough


def test_budget_beyond_the_modules_is_clamped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Paper §4.2 clamps b(t) to the modules available: 2·b0 > n warns (once per configuration) instead of raising.
    caplog.set_level(logging.WARNING, logger="flexlora_hf.config")
    FlexLoRAConfig(b0=9).validate(n_modules=18)  # bidirectional: 9 pairs need 18 matrices, fits
    FlexLoRAConfig(b0=9, allocation="prune_only").validate(n_modules=9)
    assert not caplog.records
    cfg = FlexLoRAConfig(b0=9)
    for _ in range(3):  # validated again at train start and on resume: still one warning
        cfg.validate(n_modules=17)
    FlexLoRAConfig(b0=9).validate(n_modules=17)  # the same configuration on another object
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "b0=9" in record.getMessage() and "at most 8" in record.getMessage() and "clamped" in record.getMessage()
    FlexLoRAConfig(b0=9, allocation="expand_only").validate(n_modules=5)
    assert len(caplog.records) == 2 and "at most 5" in caplog.records[-1].getMessage()


def test_budget_that_can_never_move_raises() -> None:
    with pytest.raises(ValueError, match=r"b0=1 with allocation='bidirectional' needs at least 2 adapted matrices"):
        FlexLoRAConfig(b0=1).validate(n_modules=1)
    FlexLoRAConfig(b0=0).validate(n_modules=1)  # a fixed-rank adapter on one matrix is fine
    FlexLoRAConfig(b0=3, allocation="prune_only").validate(n_modules=1)


@pytest.mark.parametrize(
    ("kwargs", "field", "fix"),
    [
        (dict(delta_t=100.5), "delta_t", "fraction of the run"),
        (dict(delta_t=0), "delta_t", ">= 1"),
        (dict(total_steps=1000.0), "total_steps", "Write total_steps=1000"),
        (dict(t_warmup=True), "t_warmup", "fraction of the run"),
        (dict(t_final="500"), "t_final", "fraction of the run"),
        (dict(t_final=-0.1), "t_final", "fraction of the run"),
        (dict(b0=2.5), "b0", "integer"),
        (dict(r=8.0), "r", "Write r=8"),
        (dict(max_rank=16.0), "max_rank", "Write max_rank=16"),
        (dict(max_rank={"model.layers.0.mlp.up_proj": 16.0}), "max_rank", "integer"),
        (dict(max_rank={"model.layers.0.mlp.up_proj": True}), "max_rank", "integer"),
        (dict(max_rank="16"), "max_rank", "integer"),
        (dict(seed=1.5), "seed", "integer"),
        (dict(lora_alpha="16"), "lora_alpha", "finite number"),
        (dict(lora_alpha=math.nan), "lora_alpha", "finite number"),
        (dict(orth_reg_weight=math.inf), "orth_reg_weight", "finite number"),
        (dict(importance=3), "importance", "choose one of"),
        (dict(target_modules=5), "target_modules", "module names"),
        (dict(target_modules=["q_proj", 3]), "target_modules", "module names"),
        (dict(modules_to_save={"classifier": 1}), "modules_to_save", "module names"),
    ],
)
def test_wrong_types_name_the_field_and_the_fix(kwargs: dict, field: str, fix: str) -> None:
    with pytest.raises(ValueError, match=rf"FlexLoRAConfig\.{field}\b.*{fix}"):
        FlexLoRAConfig(**kwargs)


def test_json_with_wrong_types_is_refused() -> None:
    data = FlexLoRAConfig().to_dict()
    data["delta_t"] = 100.5  # what a hand-edited JSON file may hold: neither a step count nor a fraction
    with pytest.raises(ValueError, match=r"delta_t=100\.5 must be an integer number of optimizer steps"):
        FlexLoRAConfig.from_dict(json.loads(json.dumps(data)))
    data["delta_t"] = 100.0  # what `--delta_t 100` parses to (the field is typed float for fractions): 100 steps
    assert FlexLoRAConfig.from_dict(data).delta_t == 100 and type(FlexLoRAConfig.from_dict(data).delta_t) is int


def test_schedule_lengths_accept_fractions_of_the_run() -> None:
    # the paper's LLaMA3-8B recipe, as fractions: T_warmup = T_final = 5000 and Δ_T 1000 over ~32k steps
    cfg = FlexLoRAConfig(t_warmup=0.15, t_final=0.15, delta_t=0.03, total_steps=32000)
    assert cfg.steps() == {"t_warmup": 4800, "t_final": 4800, "delta_t": 960}
    assert cfg.grid_kwargs()["delta_t"] == 960 and cfg.schedule_kwargs()["t_warmup"] == 4800
    assert FlexLoRAConfig.from_dict(cfg.to_dict()).t_warmup == 0.15  # saved as given, resolved per run
    with pytest.raises(ValueError, match="total_steps is unset"):
        FlexLoRAConfig(t_warmup=0.1).steps()
    with pytest.raises(ValueError, match="no reallocation can happen"):
        FlexLoRAConfig(t_warmup=0.6, t_final=0.5, total_steps=100)
    tiny = FlexLoRAConfig(t_warmup=0.1, t_final=0.1, delta_t=0.001, total_steps=50)
    assert tiny.steps() == {"t_warmup": 5, "t_final": 5, "delta_t": 1}  # a fraction never rounds Δ_T to 0


def test_schedule_fractions_parse_from_the_command_line() -> None:
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(FlexLoRAConfig).parse_args_into_dataclasses(
        ["--t_warmup", "0.1", "--t_final", "200", "--delta_t", "0.05"]
    )
    assert (cfg.t_warmup, cfg.t_final, cfg.delta_t) == (0.1, 200, 0.05) and type(cfg.t_final) is int


def test_numpy_integers_become_python_ints() -> None:
    np = pytest.importorskip("numpy")
    cfg = FlexLoRAConfig(r=np.int64(4), total_steps=np.int32(100), t_warmup=10, t_final=10)
    assert type(cfg.r) is int and type(cfg.total_steps) is int
    json.dumps(cfg.to_dict())


@pytest.mark.parametrize("value", ['{"a": "16"}', '{"a": 1.5}', '{"a": true}', "[1, 2]"])
def test_parse_max_rank_refuses_non_integer_caps(value: str) -> None:
    with pytest.raises(ValueError, match="max_rank"):
        parse_max_rank(value if not value.startswith("[") else json.loads(value))


def test_resolved_fills_and_checks_total_steps() -> None:
    cfg = FlexLoRAConfig(t_warmup=10, t_final=10)
    out = cfg.resolved(100)
    assert out.total_steps == 100 and cfg.total_steps is None
    with pytest.raises(ValueError, match="total_steps"):
        cfg.resolved(20)


def test_hf_argument_parser_list_flags() -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(FlexLoRAConfig)
    (cfg,) = parser.parse_args_into_dataclasses(["--target_modules", "q_proj", "v_proj", "--max_rank", "12"])
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.max_rank == 12
    (cfg,) = parser.parse_args_into_dataclasses(["--target_modules", "q_proj,v_proj", "--modules_to_save", "score"])
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.modules_to_save == ["score"]
    (cfg,) = parser.parse_args_into_dataclasses(["--target_modules", "all-linear"])
    assert cfg.target_modules == "all-linear"


def test_the_config_stays_readable() -> None:
    """At most 20 fields: the switches that measured as no-ops or losers were folded (config.REMOVED_FIELDS)."""
    assert len(dataclasses.fields(FlexLoRAConfig)) <= 20
    assert not set(REMOVED_FIELDS) & {f.name for f in dataclasses.fields(FlexLoRAConfig)}


def test_removed_fields_load_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """An older config naming removed fields loads; a value other than the kept behaviour is a warning, logged once."""
    old = {**FlexLoRAConfig(r=4).to_dict(), **REMOVED_FIELDS}
    assert FlexLoRAConfig.from_dict(old) == FlexLoRAConfig(r=4)
    changed = {**old, "lam_lr_ratio": 10.0, "adam_reset": "shared_step"}
    with caplog.at_level(logging.INFO, logger="flexlora_hf.config"):
        for _ in range(3):
            assert FlexLoRAConfig.from_dict(changed) == FlexLoRAConfig(r=4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "lam_lr_ratio=10.0 is now 1.0; adam_reset='shared_step' is now 'slot_age'" in warnings[0].getMessage()
    with pytest.raises(ValueError, match="lam_lr_ratoi"):  # a typo is still an error
        FlexLoRAConfig.from_dict({**old, "lam_lr_ratoi": 1.0})
