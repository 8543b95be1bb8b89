"""`--push_to_hub` in `examples/run_glue.py` and `examples/run_clm.py`, against the loopback Hub stand-in.

The scripts end as transformers' own examples do (`trainer.push_to_hub(**kwargs)` with ``--push_to_hub``, else
`trainer.create_model_card(**kwargs)`). Here the tiny base models are first uploaded to the stand-in (so the scripts
load them by Hub id, as a user would, and the card can name the base model), then each script trains with a schedule
short enough that ranks move, pushes, and the pushed repo is checked: both views of the adapter, the rank-map card
with ``base_model``, and stock PEFT loading it from the repo with the outputs of the adapter the script saved.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ADAPTER_FILES, load_example, sentences
from hub_stub import LocalHub
from huggingface_hub import HfApi
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from flexlora_hf import FlexLoRAModel

TOKEN = "hf_test_token"  # the `local_hub` fixture's user "tester"
# Events on the Δ_T = 2 grid in (2, 12 - 2], within the runs' 12 optimizer steps.
SCHEDULE = ["--r", "4", "--lora_alpha", "8", "--b0", "2", "--t_warmup", "2", "--t_final", "2", "--delta_t", "2"]
TRAINING = ["--max_steps", "12", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16"]
TRAINING += ["--learning_rate", "5e-3", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
TRAINING += ["--dataloader_pin_memory", "false", "--do_train", "--do_eval"]
HUB = ["--push_to_hub", "--hub_token", TOKEN]


def upload_base(folder: Path, repo_id: str) -> str:
    api = HfApi(token=TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    return repo_id


def front_matter(readme: bytes) -> dict:
    text = readme.decode("utf-8")
    assert text.startswith("---\n"), text[:200]
    return yaml.safe_load(text.split("---\n", 2)[1])


def assert_pushed_adapter(hub: LocalHub, repo_id: str, out: Path, base_id: str) -> tuple[dict, str]:
    """Both views, the rank map and history with moves, and a card naming the base model; returns (meta, card)."""
    files = hub.files(repo_id)
    missing = [name for name in ADAPTER_FILES if name not in files]
    assert not missing, f"{repo_id} lacks {missing}; has {sorted(files)}"
    for name in ("flexlora_adapter.safetensors", "adapter_model.safetensors", "rank_map.json"):
        assert files[name] == (out / name).read_bytes(), f"{name} differs from the saved adapter"
    ranks = json.loads(files["rank_map.json"])
    assert set(ranks.values()) != {4}, "the rank map never changed"
    history = json.loads(files["rank_history.json"])
    assert any(event["prune"] or event["expand"] for event in history)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == base_id
    meta = front_matter(files["README.md"])
    card = files["README.md"].decode("utf-8")
    assert meta["base_model"] == base_id
    assert meta["library_name"] == "peft" and "flexlora" in meta["tags"]
    changed = next(name for name, rank in ranks.items() if rank != 4)
    assert changed.split(".")[-1] in card and "(rank_heatmap.png)" in card  # the rank map and heatmap are shown
    assert f'PeftModel.from_pretrained(base, "{repo_id}")' in card
    return meta, card


def test_run_glue_push_to_hub(local_hub: LocalHub, tiny_bert_dir, tmp_path):
    base_id = upload_base(tiny_bert_dir, "tester/tiny-bert")
    rows = sentences(96, seed=1)
    for name, part in (("train", rows[:64]), ("dev", rows[64:])):
        with (tmp_path / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("sentence", "label"), *part])
    out = tmp_path / "out"
    metrics = load_example("run_glue").main(
        ["--model_name_or_path", base_id, "--task_name", "sst2"]
        + ["--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv")]
        + ["--max_seq_length", "32", "--output_dir", str(out), "--hub_model_id", "glue-run"]
        + TRAINING
        + SCHEDULE
        + HUB
    )
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0  # the glue module's sst2 metric, through evaluate
    meta, _ = assert_pushed_adapter(local_hub, "tester/glue-run", out, base_id)  # a bare name: the token's user
    assert meta["pipeline_tag"] == "text-classification"
    assert "glue" in meta["datasets"]
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["config"] == "sst2"
    reported = {m["type"]: m["value"] for m in results["metrics"]}
    assert reported["accuracy"] == pytest.approx(metrics["eval_accuracy"])

    # Stock PEFT, from the pushed repo alone: the base model named in adapter_config.json comes from the Hub too.
    tokenizer = AutoTokenizer.from_pretrained(base_id)
    batch = tokenizer([text for text, _ in rows[64:72]], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = FlexLoRAModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_id), str(out))
        expected = expected.eval()(**batch).logits
        peft_model = AutoPeftModelForSequenceClassification.from_pretrained("tester/glue-run").eval()
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_run_clm_push_to_hub(local_hub: LocalHub, tiny_llama_dir, tmp_path):
    base_id = upload_base(tiny_llama_dir, "tester/tiny-llama")
    lines = [text for text, _ in sentences(300, seed=2)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:260]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(lines[260:]) + "\n")
    out = tmp_path / "out"
    metrics = load_example("run_clm").main(
        ["--model_name_or_path", base_id, "--block_size", "32", "--output_dir", str(out)]
        + ["--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt")]
        + ["--target_modules", "q_proj,k_proj,v_proj,up_proj,down_proj", "--hub_model_id", "tester/clm-run"]
        + TRAINING
        + SCHEDULE
        + HUB
    )
    assert metrics["perplexity"] > 1.0
    assert 0.0 < metrics["eval_accuracy"] < 1.0  # next-token accuracy through the local accuracy module
    meta, _ = assert_pushed_adapter(local_hub, "tester/clm-run", out, base_id)
    assert meta["pipeline_tag"] == "text-generation"

    ids = AutoTokenizer.from_pretrained(base_id)(lines[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = FlexLoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), str(out))
        expected = expected.eval()(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), "tester/clm-run")
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
