"""Validation at injection: `max_rank` keys must name adapted modules, and a budget larger than the modules allow is
clamped with one warning (paper §4.2) while a budget that can never move anything still raises.

Config-only checks (integer fields, wrong JSON types) are in `test_config.py`; damaged adapter folders in
`test_hostile_files.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import flex_config, random_lambda, tiny_llama

from flexlora_hf import get_flexlora_model, load_flexlora

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


# ---------------------------------------------------------------------------------------------- max_rank keys
@pytest.mark.parametrize(
    ("keys", "unknown"),
    [
        ({"model.layers.0.self_attn.q_prj": 8}, "'model.layers.0.self_attn.q_prj'"),  # a typo
        ({"q_proj": 8}, "'q_proj'"),  # a bare suffix: caps take full paths
        ({Q0: 8, "model.layers.7.mlp.up_proj": 8}, "'model.layers.7.mlp.up_proj'"),  # no such layer
    ],
    ids=["typo", "bare-suffix", "missing-layer"],
)
def test_unknown_max_rank_keys_raise_listing_the_adapted_modules(keys: dict, unknown: str) -> None:
    with pytest.raises(ValueError, match="max_rank names modules that are not adapted") as caught:
        get_flexlora_model(tiny_llama(), flex_config(max_rank=keys))
    message = str(caught.value)
    assert unknown in message
    assert Q0 in message and "model.layers.1.mlp.down_proj" in message  # the adapted modules are listed
    assert "target_modules" in message  # and how to fix it


def test_max_rank_key_of_a_module_left_out_of_the_targets_raises() -> None:
    with pytest.raises(ValueError, match=rf"not adapted: '{V1}'"):
        get_flexlora_model(tiny_llama(), flex_config(target_modules=["q_proj"], max_rank={V1: 8}))


def test_known_max_rank_keys_set_those_caps_only(tmp_path: Path) -> None:
    derived = get_flexlora_model(tiny_llama(), flex_config()).rank_caps()
    fm = get_flexlora_model(tiny_llama(), flex_config(max_rank={Q0: 9}))
    caps = fm.rank_caps()
    assert caps[Q0] == 9 and derived[Q0] != 9
    assert {n: c for n, c in caps.items() if n != Q0} == {n: c for n, c in derived.items() if n != Q0}
    # The mapping survives a save / trainable load (read_adapter checks its keys against the saved modules).
    fm.save_pretrained(tmp_path)
    loaded = load_flexlora(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.flexlora_config.max_rank == {Q0: 9} and loaded.rank_caps() == caps


# ---------------------------------------------------------------------------------------------- budget clamp
def test_budget_beyond_the_modules_is_clamped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flexlora_hf.config")
    # 4 adapted matrices allow 2 prune/expand pairs per event; b0=7 asked for 7 (previously a ValueError).
    fm = get_flexlora_model(tiny_llama(), flex_config(target_modules=["q_proj", "v_proj"], b0=7))
    cfg = fm.flexlora_config
    cfg.validate(n_modules=len(fm.module_names))  # what the Trainer's start does again: no second warning
    warnings = [r for r in caplog.records if "clamped" in r.getMessage()]
    assert len(warnings) == 1
    assert "b0=7" in warnings[0].getMessage() and "at most 2" in warnings[0].getMessage()
    # Events run with the clamped budget: every event moves at most one pair per two matrices, and conserves rank.
    total = fm.total_rank()
    for step in (20, 30):  # b(t) = 5, then 3
        random_lambda(fm, seed=step)
        record = fm.update_and_allocate(step)
        assert record is not None and record["budget"] > 2
        assert len(record["prune"]) == len(record["expand"]) <= 2
        assert fm.total_rank() == total
    assert len([r for r in caplog.records if "clamped" in r.getMessage()]) == 1  # not one per event


def test_a_budget_that_can_never_move_raises_at_injection() -> None:
    with pytest.raises(ValueError, match=r"needs at least 2 adapted matrices.*b0=0"):
        get_flexlora_model(tiny_llama(), flex_config(target_modules=[Q0], b0=1))
    assert get_flexlora_model(tiny_llama(), flex_config(target_modules=[Q0], b0=0)).module_names == [Q0]
    one_sided = get_flexlora_model(tiny_llama(), flex_config(target_modules=[Q0], b0=1, allocation="prune_only"))
    assert one_sided.module_names == [Q0]
