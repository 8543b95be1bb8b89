"""`FlexLoRAConfig`: JSON round trip, command-line parsing, validation messages naming the field."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser

from flexlora_hf.config import CONFIG_NAME, FlexLoRAConfig


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
        min_rank=2,
        max_rank={"model.layers.0.self_attn.q_proj": 9},
        importance="mat_energy_entropy",
        allocation="prune_only",
        expansion_init="orthogonal",
        schedule="window",
        init_scale=0.05,
        small_init_value=1e-2,
        entropy_eps=1e-9,
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
        (dict(min_rank=9, r=8), "min_rank"),
        (dict(init_scale=0.0), "init_scale"),
        (dict(entropy_eps=-1.0), "entropy_eps"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"(?<![A-Za-z_]){field}(?![A-Za-z_])"):
        FlexLoRAConfig(**kwargs)


def test_window_boundary_is_valid() -> None:
    FlexLoRAConfig(t_warmup=500, t_final=499, total_steps=1000)  # one step of window is enough


def test_validate_n_modules() -> None:
    cfg = FlexLoRAConfig(b0=4)
    cfg.validate(n_modules=8)  # bidirectional needs 2·b0
    with pytest.raises(ValueError, match=r"FlexLoRAConfig\.b0=4 needs 8"):
        cfg.validate(n_modules=7)
    FlexLoRAConfig(b0=4, allocation="prune_only").validate(n_modules=4)
    with pytest.raises(ValueError, match="b0"):
        FlexLoRAConfig(b0=4, allocation="expand_only").validate(n_modules=3)


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
