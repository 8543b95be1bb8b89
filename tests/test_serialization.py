"""The rank-annotated adapter folder: native round trip, the plain PEFT view, merging, model card, heatmap, bad input.

Tiny random models built from configs (Llama, BERT classifier, GPT-2 Conv1D); nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import PNG_SIGNATURE, flex_config, logits, random_lambda, tiny_bert, tiny_gpt2, tiny_llama, trained
from huggingface_hub import EvalResult, ModelCard, metadata_load
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import RobertaConfig, RobertaForSequenceClassification

from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, get_flexlora_model, load_flexlora
from flexlora_hf.functional import plan_reallocation
from flexlora_hf.io import atomic
from flexlora_hf.io.model_card import build_model_card, load_template, rank_tables
from flexlora_hf.io.native import load_adapter_into
from flexlora_hf.io.peft_view import peft_export
from flexlora_hf.io.plotting import depth_order, plot_rank_history, short_module_types, split_module_path
from flexlora_hf.io.save import save_flexlora

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[FlexLoRAModel, Path]:
    fm = trained(tiny_llama)
    path = tmp_path_factory.mktemp("llama") / "adapter"
    save_flexlora(fm, path)
    return fm, path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[FlexLoRAModel, Path]:
    fm = trained(tiny_bert)
    path = tmp_path_factory.mktemp("bert") / "adapter"
    save_flexlora(
        fm,
        path,
        model_card_kwargs={
            "base_model": "google-bert/bert-base-uncased",
            "datasets": ["nyu-mll/glue"],
            "metrics": ["accuracy"],
            "eval_results": {"accuracy": 0.875, "f1": 0.8},
            "training_args": {"learning_rate": 5e-4, "num_train_epochs": 3, "seed": 42},
        },
    )
    return fm, path


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------------------------------------ native round trip
def test_folder_holds_both_views_and_no_temp_files(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    fm, path = llama_dir
    assert sorted(os.listdir(path)) == sorted(
        [
            "flexlora_config.json",
            "flexlora_adapter.safetensors",
            "rank_map.json",
            "rank_history.json",
            "adapter_config.json",
            "adapter_model.safetensors",
            "rank_heatmap.png",
            "README.md",
        ]
    )
    cfg = json.loads((path / "flexlora_config.json").read_text())
    assert cfg["_capacity"] == fm.rank_caps()
    assert cfg["_flexlora_hf_version"]
    assert "_base_model_name_or_path" in cfg
    assert FlexLoRAConfig.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")}).to_dict() == (
        fm.flexlora_config.to_dict()
    )
    assert json.loads((path / "rank_map.json").read_text()) == fm.rank_map()
    assert json.loads((path / "rank_history.json").read_text()) == fm.rank_history

    tensors = load_file(path / "flexlora_adapter.safetensors")
    for name, layer in fm.flexlora_layers():
        r = layer.rank
        assert tensors[f"{name}.P"].shape == (layer.out_features, r)
        assert tensors[f"{name}.lam"].shape == (r,)
        assert tensors[f"{name}.Q"].shape == (r, layer.in_features)
        assert tensors[f"{name}.slots"].dtype == torch.int64
        assert tensors[f"{name}.slots"].tolist() == layer.active_slots().tolist()
    assert len(tensors) == 4 * len(fm.module_names)  # a causal LM has no modules_to_save


def test_native_round_trip_is_exact(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    fm, path = llama_dir
    assert len(set(fm.rank_map().values())) > 1, "the fixture must have moved ranks"
    saved = dict(fm.flexlora_layers())
    for trainable in (True, False):
        loaded = load_flexlora(tiny_llama(), path, is_trainable=trainable)
        assert torch.equal(logits(loaded), logits(fm))
        assert loaded.rank_map() == fm.rank_map()
        # training keeps the saved slot capacity; inference holds exactly the active directions (no spare slots)
        assert loaded.rank_caps() == (fm.rank_caps() if trainable else fm.rank_map())
        assert loaded.rank_history == fm.rank_history
        assert loaded.flexlora_config.to_dict() == fm.flexlora_config.to_dict()
        for name, layer in loaded.flexlora_layers():
            ref = saved[name]
            assert layer.active_slots().tolist() == ref.active_slots().tolist()
            r = ref.rank
            assert torch.equal(layer.lora_P[:, :r], ref.lora_P[:, :r]) and torch.equal(layer.lora_Q[:r], ref.lora_Q[:r])
            assert torch.equal(layer.lora_lam[:r], ref.lora_lam[:r])
            if trainable:
                for attr in ("lora_P", "lora_lam", "lora_Q", "lora_active"):
                    assert torch.equal(getattr(layer, attr), getattr(ref, attr)), (name, attr)
    # Inference by default: nothing trainable, eval mode.
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training


def test_round_trip_through_model_methods_and_continue_training(
    llama_dir: tuple[FlexLoRAModel, Path], tmp_path: Path
) -> None:
    fm, path = llama_dir
    loaded = FlexLoRAModel.from_pretrained(tiny_llama(), str(path), is_trainable=True)
    assert all(layer.lora_lam.requires_grad for _, layer in loaded.flexlora_layers())
    assert loaded.capacity_final
    # Reallocation keeps working on the loaded adapter (capacities and free slots restored).
    random_lambda(loaded, seed=5)
    plan = plan_reallocation(loaded.importance_scores(), loaded.rank_map(), 2, max_rank=loaded.rank_caps())
    loaded.apply_plan(plan, step=60)
    assert loaded.total_rank() == fm.total_rank()
    loaded.save_pretrained(str(tmp_path / "again"))
    again = load_flexlora(tiny_llama(), tmp_path / "again")
    assert torch.equal(logits(again), logits(loaded.eval()))


def test_config_overrides(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    _, path = llama_dir
    loaded = load_flexlora(tiny_llama(), path, config_overrides={"total_steps": 400, "orth_reg_weight": 0.0})
    assert loaded.flexlora_config.total_steps == 400
    assert loaded.flexlora_config.orth_reg_weight == 0.0


def test_modules_to_save_round_trip(bert_dir: tuple[FlexLoRAModel, Path]) -> None:
    fm, path = bert_dir
    tensors = load_file(path / "flexlora_adapter.safetensors")
    assert {k for k in tensors if k.startswith("modules_to_save.")} == {
        "modules_to_save.classifier.weight",
        "modules_to_save.classifier.bias",
    }
    loaded = load_flexlora(tiny_bert(), path)
    assert torch.equal(loaded.get_base_model().classifier.weight, fm.get_base_model().classifier.weight)
    assert torch.equal(logits(loaded), logits(fm))


def test_gpt2_conv1d_round_trip(tmp_path: Path) -> None:
    fm = trained(tiny_gpt2)
    save_flexlora(fm, tmp_path)
    loaded = load_flexlora(tiny_gpt2(), tmp_path)
    assert torch.equal(logits(loaded), logits(fm))


def test_saving_is_deterministic(llama_dir: tuple[FlexLoRAModel, Path], tmp_path: Path) -> None:
    fm, path = llama_dir
    save_flexlora(fm, tmp_path)
    for f in path.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_base_model_name_is_recorded(tmp_path: Path) -> None:
    base = tiny_llama()
    base.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    save_flexlora(get_flexlora_model(base, flex_config()), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M"
    )
    assert json.loads((tmp_path / "flexlora_config.json").read_text())["_base_model_name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M"
    )
    meta = metadata_load(tmp_path / "README.md")
    assert meta is not None and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_is_main_process_false_writes_nothing(tmp_path: Path) -> None:
    fm = get_flexlora_model(tiny_llama(), flex_config())
    save_flexlora(fm, tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()


def test_safe_serialization_false_is_refused(tmp_path: Path) -> None:
    fm = get_flexlora_model(tiny_llama(), flex_config())
    with pytest.raises(ValueError, match="safetensors"):
        save_flexlora(fm, tmp_path, safe_serialization=False)


def test_interrupted_save_keeps_previous_files(
    llama_dir: tuple[FlexLoRAModel, Path], tmp_path: Path, monkeypatch
) -> None:
    fm, path = llama_dir
    target = copy_dir(path, tmp_path / "adapter")
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(atomic.json, "dump", crash)  # dies while writing the first JSON file
    with pytest.raises(KeyboardInterrupt):
        save_flexlora(fm, target)
    monkeypatch.undo()
    assert sorted(f.name for f in target.iterdir()) == sorted(before)  # no temp file left behind
    for name in ("flexlora_config.json", "rank_map.json", "rank_history.json", "adapter_config.json"):
        assert (target / name).read_bytes() == before[name]
    assert torch.equal(logits(load_flexlora(tiny_llama(), target)), logits(fm))


def test_weights_are_never_unpickled(llama_dir: tuple[FlexLoRAModel, Path], monkeypatch) -> None:
    _, path = llama_dir

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_flexlora(tiny_llama(), path)


def test_load_adapter_into_existing_model(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    fm, path = llama_dir
    # A fresh model built from the same config (what a Trainer resuming from a checkpoint holds) but with bigger
    # slots: the checkpoint's capacities win, so optimizer.pt moments keep their shapes.
    target = get_flexlora_model(tiny_llama(), flex_config(max_rank=9)).eval()
    load_adapter_into(target, path)
    assert torch.equal(logits(target), logits(fm))
    assert target.rank_map() == fm.rank_map()
    assert target.rank_caps() == fm.rank_caps()
    assert target.rank_history == fm.rank_history
    assert all(layer.lora_P.requires_grad for _, layer in target.flexlora_layers())


def test_load_adapter_into_other_modules_fails(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    _, path = llama_dir
    target = get_flexlora_model(tiny_llama(), flex_config(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="adapts other modules"):
        load_adapter_into(target, path)


# --------------------------------------------------------------------------------------------------------- PEFT view
def _peft_reference(make: Callable[[], torch.nn.Module], fm: FlexLoRAModel) -> dict[str, tuple[int, ...]]:
    """Keys and shapes PEFT itself saves for a LoRA with the same per-module ranks."""
    ranks = {n: r for n, r in fm.rank_map().items() if r > 0}
    lora = LoraConfig(
        r=4,
        target_modules=list(ranks),
        rank_pattern=ranks,
        modules_to_save=fm.flexlora_config.modules_to_save,
    )
    state = get_peft_model_state_dict(get_peft_model(make(), lora))
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_peft_view_keys_match_peft(which: str, llama_dir, bert_dir) -> None:
    fm, path = llama_dir if which == "llama" else bert_dir
    make = tiny_llama if which == "llama" else tiny_bert
    ours = {k: tuple(v.shape) for k, v in load_file(path / "adapter_model.safetensors").items()}
    assert ours == _peft_reference(make, fm)


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_stock_peft_reproduces_outputs(which: str, llama_dir, bert_dir) -> None:
    fm, path = llama_dir if which == "llama" else bert_dir
    make = tiny_llama if which == "llama" else tiny_bert
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["task_type"] == ("CAUSAL_LM" if which == "llama" else "SEQ_CLS")
    assert adapter_config["target_modules"] == [n for n, r in fm.rank_map().items() if r > 0]
    assert adapter_config["rank_pattern"] == adapter_config["alpha_pattern"] == fm.rank_map()
    peft_model = PeftModel.from_pretrained(make(), str(path)).eval()
    for name, layer in fm.flexlora_layers():
        lora_layer = peft_model.base_model.model.get_submodule(name)
        assert lora_layer.r["default"] == layer.rank
        assert lora_layer.scaling["default"] == 1.0
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)
    base_out = logits(make())
    assert not torch.allclose(base_out, logits(fm), atol=1e-4), "the adapter must change the outputs"


def test_peft_view_gpt2_conv1d(tmp_path: Path) -> None:
    fm = trained(tiny_gpt2)
    save_flexlora(fm, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True
    assert adapter_config["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(fm), rtol=1e-5, atol=1e-5)


def test_rank_zero_module_is_left_out_of_peft_view(tmp_path: Path) -> None:
    fm = trained(tiny_llama, events=1)
    dropped = fm.module_names[0]
    layer = dict(fm.flexlora_layers())[dropped]
    while layer.rank:
        layer.prune_smallest()
    save_flexlora(fm, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert dropped not in adapter_config["target_modules"]
    assert dropped not in adapter_config["rank_pattern"]
    assert not any(
        k.startswith(f"base_model.model.{dropped}.") for k in load_file(tmp_path / "adapter_model.safetensors")
    )
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)
    loaded = load_flexlora(tiny_llama(), tmp_path)
    assert loaded.rank_map()[dropped] == 0
    assert torch.equal(logits(loaded), logits(fm))


def test_adapted_layer_inside_modules_to_save(tmp_path: Path) -> None:
    # RoBERTa's head `classifier` holds linear layers (`dense`, `out_proj`) that a suffix target can also adapt.
    def roberta() -> RobertaForSequenceClassification:
        torch.manual_seed(0)
        cfg = RobertaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=70,
            num_labels=2,
        )
        return RobertaForSequenceClassification(cfg).eval()

    fm = trained(roberta, events=1, target_modules=["query", "dense"], b0=1)
    # A module trained in full is never also adapted (PEFT would ignore such a LoRA inside its modules_to_save copy).
    assert "classifier.dense" not in fm.module_names and fm.flexlora_config.modules_to_save == ["classifier"]
    save_flexlora(fm, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "classifier.dense" not in adapter_config["target_modules"]
    peft_model = PeftModel.from_pretrained(roberta(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(fm), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(load_flexlora(roberta(), tmp_path)), logits(fm))


def test_rank_pattern_keys_are_ordered_deepest_first() -> None:
    fm = get_flexlora_model(tiny_llama(), flex_config())
    adapter_config, _ = peft_export(fm)
    depths = [k.count(".") for k in adapter_config["rank_pattern"]]
    assert depths == sorted(depths, reverse=True)


# ----------------------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert, tiny_gpt2], ids=["llama", "bert", "gpt2"])
def test_merged_equals_unmerged(make: Callable[[], torch.nn.Module]) -> None:
    fm = trained(make)
    expected = logits(fm)
    merged = fm.merge_and_unload()
    assert not any(type(m).__name__ == "FlexLoRALayer" for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- model card
def test_model_card_metadata_and_body(bert_dir: tuple[FlexLoRAModel, Path]) -> None:
    fm, path = bert_dir
    meta = metadata_load(path / "README.md")
    assert meta is not None
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "google-bert/bert-base-uncased"
    assert {"flexlora", "lora", "peft"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["datasets"] == ["nyu-mll/glue"]
    assert meta["metrics"] == ["accuracy"]
    card = ModelCard.load(path / "README.md")
    text = card.text
    assert "entropy-guided FlexLoRA" in text and "Bai et al." in text
    assert "PeftModel.from_pretrained" in text and "FlexLoRAModel.from_pretrained" in text
    assert "num_labels=3" in text
    assert "![" in text and "(rank_heatmap.png)" in text
    # Rank table: one row per layer, one column per module type, as short as keeps BERT's types apart.
    header = "| layer | query | key | value | attention.output.dense | intermediate.dense | output.dense | total |"
    assert header in text
    for layer_index in (0, 1):
        assert f"\n| {layer_index} | " in text
    assert "3 reallocation events between optimizer steps 20 and 40 pruned" in text
    assert "## Budget" in text and "fixed-rank LoRA with the same total rank" in text
    assert f"| total rank | {fm.total_rank()} " in text
    assert "## FlexLoRA hyper-parameters" in text and "| importance | entropy |" in text
    assert "## Training hyper-parameters" in text and "| learning_rate | 0.0005 |" in text
    assert "## Evaluation results" in text and "| accuracy | 0.875 |" in text


def test_model_card_without_optional_sections(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    _, path = llama_dir
    text = (path / "README.md").read_text()
    meta = metadata_load(path / "README.md")
    assert meta is not None and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a model built from a config has no Hub id
    assert "## Training hyper-parameters" not in text and "## Evaluation results" not in text
    assert "| layer | q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj | total |" in text


def test_model_card_eval_results_go_to_model_index() -> None:
    fm = get_flexlora_model(tiny_llama(), flex_config())
    result = EvalResult(
        task_type="text-generation",
        dataset_type="social_iqa",
        dataset_name="SocialIQA",
        metric_type="accuracy",
        metric_value=0.5,
    )
    card = build_model_card(fm, base_model="HuggingFaceTB/SmolLM2-135M", eval_results=[result], repo_id="me/flex")
    data = card.data.to_dict()
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M" in data["tags"]
    assert 'PeftModel.from_pretrained(base, "me/flex")' in card.text
    assert "| text-generation | SocialIQA |" in card.text


def test_template_copies_are_identical() -> None:
    shipped = (REPO_ROOT / "flexlora_hf" / "templates" / "flexlora_template.md").read_text(encoding="utf-8")
    assert (REPO_ROOT / "model_cards" / "flexlora_template.md").read_text(encoding="utf-8") == shipped
    assert load_template() == shipped


def test_rank_table_helpers() -> None:
    assert split_module_path("model.layers.3.self_attn.q_proj") == ("model.layers", 3, "self_attn.q_proj")
    assert split_module_path("pooler.dense") == ("pooler.dense", None, "pooler.dense")
    assert short_module_types(
        ["attention.self.query", "attention.output.dense", "output.dense", "intermediate.dense"]
    ) == {
        "attention.self.query": "query",
        "attention.output.dense": "attention.output.dense",
        "output.dense": "output.dense",
        "intermediate.dense": "intermediate.dense",
    }
    assert short_module_types(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]) == {
        "attn.c_attn": "c_attn",
        "attn.c_proj": "attn.c_proj",
        "mlp.c_fc": "c_fc",
        "mlp.c_proj": "mlp.c_proj",
    }
    names = ["dec.block.1.q", "enc.block.10.q", "enc.block.2.q", "dec.block.0.q", "head"]
    assert depth_order(names) == ["dec.block.0.q", "dec.block.1.q", "enc.block.2.q", "enc.block.10.q", "head"]
    main, other = rank_tables({"enc.block.0.q": 2, "enc.block.0.v": 3, "dec.block.0.q": 4, "pooler.dense": 1})
    assert "| layer | q | v | total |" in main
    assert "| enc.block.0 | 2 | 3 | 5 |" in main and "| dec.block.0 | 4 | – | 4 |" in main
    assert "| pooler.dense | 1 |" in other


# ----------------------------------------------------------------------------------------------------------- heatmap
def test_heatmap_png(llama_dir: tuple[FlexLoRAModel, Path], tmp_path: Path) -> None:
    fm, path = llama_dir
    assert (path / "rank_heatmap.png").read_bytes()[:8] == PNG_SIGNATURE
    fig = plot_rank_history(fm.rank_history, tmp_path / "h.png", title="moves")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (len(fm.module_names), len(fm.rank_history) + 1)
    assert fig.axes[0].get_title() == "moves"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["start", "20", "30", "40"]
    assert (image[:, 0] == fm.flexlora_config.r).all()  # the first event undone: uniform initial rank
    assert image[:, -1].tolist() == [fm.rank_map()[n] for n in depth_order(fm.module_names)]
    # Records without prune/expand lists: one column per record.
    bare = [{"step": h["step"], "ranks": h["ranks"]} for h in fm.rank_history]
    assert plot_rank_history(bare).axes[0].images[0].get_array().shape == (len(fm.module_names), len(bare))
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_SIGNATURE


def test_heatmap_of_empty_history_is_the_current_rank_map(tmp_path: Path) -> None:
    fm = get_flexlora_model(tiny_llama(), flex_config())
    fig = plot_rank_history(fm, tmp_path / "h.png")
    assert fig.axes[0].images[0].get_array().shape == (len(fm.module_names), 1)
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_SIGNATURE
    assert plot_rank_history(fm.rank_map()).axes[0].images[0].get_array().shape == (len(fm.module_names), 1)
    with pytest.raises(ValueError, match="empty"):
        plot_rank_history([])


# ------------------------------------------------------------------------------------------------------- bad input
def test_base_model_lacks_an_adapted_module(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    _, path = llama_dir
    with pytest.raises(ValueError, match=r"no module 'model\.layers\.1\.self_attn\.q_proj'"):
        load_flexlora(tiny_llama(layers=1), path)


def test_shape_mismatch_names_the_module(llama_dir: tuple[FlexLoRAModel, Path]) -> None:
    _, path = llama_dir
    with pytest.raises(
        ValueError, match=r"shape mismatch for module 'model\.layers\.0\.self_attn\.q_proj'.*\(32 x 32\).*\(48 x 48\)"
    ):
        load_flexlora(tiny_llama(hidden=48), path)


def test_head_shape_mismatch(bert_dir: tuple[FlexLoRAModel, Path]) -> None:
    _, path = bert_dir
    with pytest.raises(ValueError, match=r"modules_to_save weight 'classifier\.(weight|bias)'.*num_labels"):
        load_flexlora(tiny_bert(num_labels=5), path)


def test_rank_map_disagreeing_with_tensors(llama_dir, tmp_path: Path) -> None:
    fm, path = llama_dir
    target = copy_dir(path, tmp_path / "adapter")
    rank_map = json.loads((target / "rank_map.json").read_text())
    name = fm.module_names[2]
    rank_map[name] += 1
    (target / "rank_map.json").write_text(json.dumps(rank_map))
    with pytest.raises(
        ValueError, match=rf"rank_map\.json says module '{name}' has rank {rank_map[name]}.*holds {rank_map[name] - 1}"
    ):
        load_flexlora(tiny_llama(), target)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(llama_dir, tmp_path: Path, damage: str) -> None:
    _, path = llama_dir
    target = copy_dir(path, tmp_path / "adapter")
    weights = target / "flexlora_adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"flexlora_adapter\.safetensors.*truncated or corrupt"):
        load_flexlora(tiny_llama(), target)


def test_corrupt_json_names_the_file(llama_dir, tmp_path: Path) -> None:
    _, path = llama_dir
    target = copy_dir(path, tmp_path / "adapter")
    (target / "flexlora_config.json").write_text('{"r": 4, ')
    with pytest.raises(ValueError, match=r"flexlora_config\.json is not valid JSON"):
        load_flexlora(tiny_llama(), target)


@pytest.mark.parametrize("missing", ["flexlora_config.json", "flexlora_adapter.safetensors", "rank_map.json"])
def test_missing_file(llama_dir, tmp_path: Path, missing: str) -> None:
    _, path = llama_dir
    target = copy_dir(path, tmp_path / "adapter")
    (target / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing.replace('.', '[.]')} is missing from"):
        load_flexlora(tiny_llama(), target)


def test_missing_rank_history_starts_empty(llama_dir, tmp_path: Path) -> None:
    fm, path = llama_dir
    target = copy_dir(path, tmp_path / "adapter")
    (target / "rank_history.json").unlink()
    loaded = load_flexlora(tiny_llama(), target)
    assert loaded.rank_history == []
    assert torch.equal(logits(loaded), logits(fm))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        load_flexlora(tiny_llama(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        load_flexlora(tiny_llama(), "./nope/adapter")


def test_folder_without_the_v2_fields_keeps_v01_behaviour(llama_dir, tmp_path: Path) -> None:
    """A v0.1 folder names no init_basis / svd_prune / grace_events: continuing it must not switch behaviour."""
    _, path = llama_dir
    old = copy_dir(path, tmp_path / "v01")
    cfg = json.loads((old / "flexlora_config.json").read_text())
    for key in ("init_basis", "svd_prune", "grace_events"):
        cfg.pop(key)
    (old / "flexlora_config.json").write_text(json.dumps(cfg))
    c = load_flexlora(tiny_llama(), old, is_trainable=True).flexlora_config
    assert (c.init_basis, c.svd_prune, c.grace_events) == ("gaussian", False, 0)
    assert load_flexlora(tiny_llama(), path).flexlora_config.init_basis == "orthonormal"  # v2 folders: as saved


def test_folder_naming_removed_fields_loads_unchanged(llama_dir, tmp_path: Path, caplog) -> None:
    """A folder written while the config still had lam_lr_ratio, adam_reset, ... loads with the same weights and
    outputs; the removed keys are named in one warning when a value differs from the behaviour kept."""
    fm, path = llama_dir
    old = copy_dir(path, tmp_path / "v05")
    cfg = json.loads((old / "flexlora_config.json").read_text())
    cfg.update({"lam_lr_rule": "lora_matched", "lam_lr_ratio": 1.0, "basis_lr_ratio": 1.0, "adam_reset": "slot_age",
                "init_from_gradient": False, "init_scale": 0.02, "small_init_value": 1e-3, "entropy_eps": 1e-12,
                "min_rank": 1})
    (old / "flexlora_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="flexlora_hf.config"):
        loaded = load_flexlora(tiny_llama(), old)
    assert loaded.flexlora_config == load_flexlora(tiny_llama(), path).flexlora_config
    torch.testing.assert_close(logits(loaded), logits(load_flexlora(tiny_llama(), path)))
    assert [r.getMessage() for r in caplog.records if "lam_lr_rule='lora_matched'" in r.getMessage()]
