"""Rank-map transfer (`flexlora_hf.io.transfer`): FlexLoRA's allocation as a stock PEFT `LoraConfig`.

A PEFT LoRA built from `to_lora_config()` must have exactly the saved rank map (rank-0 modules left out, with a log
line) and the scale its alpha policy promises; loading the PEFT view that `save_pretrained` writes into it must
reproduce the FlexLoRA model's logits. Tiny random models; the Hub is the loopback stand-in.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers import logits, tiny_bert, tiny_gpt2, tiny_llama, trained
from hub_stub import LocalHub
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from flexlora_hf import FlexLoRAModel, to_lora_config
from flexlora_hf.io.save import save_flexlora
from flexlora_hf.io.transfer import lora_config_from_pretrained, lora_config_from_rank_map
from flexlora_hf.io.warm_start import load_peft_view

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"


def lora_ranks(peft_model: PeftModel) -> dict[str, int]:
    """Module path in the base model -> LoRA rank of every LoRA layer."""
    return {
        name.removeprefix("base_model.model."): int(module.r["default"])
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def lora_scales(peft_model: PeftModel) -> dict[str, float]:
    return {
        name.removeprefix("base_model.model."): float(module.scaling["default"])
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def with_a_rank_zero_module(fm: FlexLoRAModel) -> str:
    """Prune one adapted module down to rank 0 (what many prune events would do) and return its path."""
    name, layer = next(iter(fm.flexlora_layers()))
    while layer.rank:
        layer.prune_smallest()
    return name


@pytest.fixture(scope="module")
def bert_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[FlexLoRAModel, Path, str]:
    fm = trained(tiny_bert)
    zero = with_a_rank_zero_module(fm)
    path = tmp_path_factory.mktemp("transfer") / "bert"
    save_flexlora(fm, path)
    return fm, path, zero


@pytest.mark.parametrize("alpha_policy", ["constant_scale", "constant_alpha"])
def test_lora_from_the_config_has_the_rank_map_and_reproduces_the_logits(
    bert_adapter: tuple[FlexLoRAModel, Path, str], alpha_policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    fm, path, zero = bert_adapter
    saved = json.loads((path / "rank_map.json").read_text())
    assert saved[zero] == 0 and len(set(saved.values())) > 2  # ranks moved, one module emptied
    with caplog.at_level(logging.INFO, logger="flexlora_hf.io.transfer"):
        cfg = fm.to_lora_config(alpha_policy=alpha_policy)
    assert "at rank 0 left out" in caplog.text and zero in caplog.text
    assert cfg.modules_to_save == ["classifier"] and cfg.task_type == "SEQ_CLS"

    peft_model = get_peft_model(tiny_bert(), cfg).eval()
    assert lora_ranks(peft_model) == {name: rank for name, rank in saved.items() if rank > 0}
    scaling = fm.flexlora_config.lora_alpha / fm.flexlora_config.r
    for name, scale in lora_scales(peft_model).items():
        expected = scaling if alpha_policy == "constant_scale" else fm.flexlora_config.lora_alpha / saved[name]
        assert scale == pytest.approx(expected), name

    load_peft_view(peft_model, path)
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)


def test_the_adapter_file_loads_as_saved_into_a_scale_one_lora(bert_adapter: tuple[FlexLoRAModel, Path, str]) -> None:
    # With lora_alpha == r the scale is 1 under both policies, so the raw adapter_model.safetensors needs no
    # rescaling: stock PEFT's own state-dict loader reproduces FlexLoRA's logits.
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    fm, path, _ = bert_adapter
    r = fm.flexlora_config.r
    peft_model = get_peft_model(tiny_bert(), fm.to_lora_config(lora_alpha=r)).eval()
    assert set(lora_scales(peft_model).values()) == {1.0}
    result = set_peft_model_state_dict(peft_model, load_file(path / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)


def test_config_from_a_saved_folder_equals_the_live_one(bert_adapter: tuple[FlexLoRAModel, Path, str]) -> None:
    fm, path, _ = bert_adapter
    for policy in ("constant_scale", "constant_alpha"):
        assert lora_config_from_pretrained(path, alpha_policy=policy).to_dict() == fm.to_lora_config(
            alpha_policy=policy
        ).to_dict()
    assert to_lora_config(fm).to_dict() == fm.to_lora_config().to_dict()


def test_transferred_lora_saves_and_reloads_in_stock_peft(
    bert_adapter: tuple[FlexLoRAModel, Path, str], tmp_path: Path
) -> None:
    # The config survives PEFT's own JSON round trip (float alphas, exact-path patterns), weights and all.
    fm, path, _ = bert_adapter
    lora_model = load_peft_view(get_peft_model(tiny_bert(), lora_config_from_pretrained(path)), path).eval()
    lora_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert lora_ranks(reloaded) == lora_ranks(lora_model)
    torch.testing.assert_close(logits(reloaded), logits(fm), rtol=1e-5, atol=1e-5)


def test_the_transferred_lora_trains(bert_adapter: tuple[FlexLoRAModel, Path, str]) -> None:
    fm, _, _ = bert_adapter
    model = get_peft_model(tiny_bert(), fm.to_lora_config()).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    out = model(input_ids=torch.randint(0, 100, (4, 7)), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_conv1d_and_causal_lm(tmp_path: Path) -> None:
    for make in (tiny_gpt2, tiny_llama):
        fm = trained(make)
        save_flexlora(fm, tmp_path / make.__name__)
        cfg = fm.to_lora_config()
        assert cfg.fan_in_fan_out is (make is tiny_gpt2) and cfg.task_type == "CAUSAL_LM"
        peft_model = load_peft_view(get_peft_model(make(), cfg), tmp_path / make.__name__).eval()
        assert lora_ranks(peft_model) == fm.rank_map()
        torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)


def test_alpha_values_and_pattern_order() -> None:
    cfg = lora_config_from_rank_map(
        {"a.q": 8, "a.o": 12, "b.a.o": 3, "c": 8}, r=8, lora_alpha=16, alpha_policy="constant_scale"
    )
    assert (cfg.r, cfg.lora_alpha) == (8, 16)
    assert cfg.alpha_pattern == {"b.a.o": 6, "a.q": 16, "a.o": 24, "c": 16}
    assert next(iter(cfg.rank_pattern)) == "b.a.o"  # deeper paths first: "a.o" is a suffix of it
    assert cfg.target_modules == ["a.q", "a.o", "b.a.o", "c"]
    odd = lora_config_from_rank_map({"x": 3}, r=3, lora_alpha=8, alpha_policy="constant_scale")
    assert odd.alpha_pattern == {"x": 8}
    odd = lora_config_from_rank_map({"x": 2}, r=3, lora_alpha=8)
    assert odd.alpha_pattern["x"] == pytest.approx(16 / 3)
    same = lora_config_from_rank_map({"x": 2, "y": 5}, r=3, lora_alpha=8, alpha_policy="constant_alpha")
    assert same.alpha_pattern == {"x": 8.0, "y": 8.0}


def test_bad_input_is_refused_with_the_fix(bert_adapter: tuple[FlexLoRAModel, Path, str], tmp_path: Path) -> None:
    fm, path, _ = bert_adapter
    with pytest.raises(ValueError, match="alpha_policy='rslora' is not one of"):
        fm.to_lora_config(alpha_policy="rslora")
    with pytest.raises(ValueError, match="derived from the rank map"):
        fm.to_lora_config(target_modules=["query"])
    with pytest.raises(ValueError, match="use_rslora"):
        fm.to_lora_config(use_rslora=True)
    with pytest.raises(ValueError, match="no module has rank > 0"):
        lora_config_from_rank_map({"a": 0, "b": 0}, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="must be an integer"):
        lora_config_from_rank_map({"a": 1.5}, r=4, lora_alpha=8)
    with pytest.raises(FileNotFoundError, match="flexlora_config.json is missing"):
        lora_config_from_pretrained(tmp_path)
    # A LoRA whose targets differ from the view's is refused, naming the module.
    other = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"load_peft_view: .*query"):
        load_peft_view(other, path)


def test_transfer_through_the_hub(local_hub: LocalHub, bert_adapter: tuple[FlexLoRAModel, Path, str]) -> None:
    fm, _, _ = bert_adapter
    fm.push_to_hub("tester/transfer", token=TOKEN)
    cfg = lora_config_from_pretrained("tester/transfer")
    assert cfg.to_dict() == fm.to_lora_config().to_dict()
    peft_model = load_peft_view(get_peft_model(tiny_bert(), cfg), "tester/transfer").eval()
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)


def test_transfer_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    """`benchmarks/transfer.py`'s study on a tiny BERT and synthetic tokens: every arm runs and the JSON and table
    have what docs/benchmarks.md reads (the real run uses MiniLM-L6 and BIG-bench)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from datasets import Dataset
    from transformers import default_data_collator

    from benchmarks import transfer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (48, 8), generator=g)
    labels = (ids[:, 0] % 3).tolist()
    rows = {"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 48, "label": labels}
    ds = Dataset.from_dict(rows)
    data = {
        "train": ds.select(range(32)),
        "validation": ds.select(range(32, 48)),
        "num_labels": 3,
        "collator": default_data_collator,
        "task": "synthetic",
    }

    def make_model(num_labels: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return tiny_bert(num_labels=num_labels).train()

    args = transfer.parse_args(
        ["--steps", "4", "--source-steps", "10", "--seeds", "0", "1", "--batch-size", "4", "--device", "cpu"]
    )
    assert isinstance(args, argparse.Namespace)
    out = tmp_path / "transfer.json"
    result = transfer.run_study(args, data, make_model, out)
    saved = json.loads(out.read_text())
    assert [(r["arm"], r["seed"]) for r in saved["runs"]] == [
        ("uniform", 0), ("transferred", 0), ("uniform", 1), ("transferred", 1)
    ]  # fmt: skip
    source = saved["source"]
    assert source["events"] > 0 and source["rank_summary"]["total_rank"] == 8 * 12  # 2 layers x 6 targets
    by_arm = {r["arm"]: r for r in saved["runs"]}
    assert by_arm["uniform"]["total_rank"] == 96
    assert by_arm["transferred"]["total_rank"] == 96  # same total rank, spread as FlexLoRA left it
    assert set(saved["summary"]) == {"uniform", "transferred", "paired_accuracy_difference"}
    table = transfer.format_table(result)
    assert "FlexLoRA's rank map" in table and "Source FlexLoRA run" in table
