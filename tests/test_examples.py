"""End-to-end tests of the example scripts (`examples/run_glue.py`, `examples/run_clm.py`, `examples/quickstart.py`).

Fast tests run the scripts' ``main(argv)`` in-process on tiny random models (a 2-layer BERT classifier and a
2-layer Llama) saved to a temporary folder with a byte-level BPE tokenizer trained on local text in about a second,
and on local csv/json/txt files, with a schedule short enough that reallocation events happen. They also cover
`flexlora_hf.integrations.arguments` (the command-line face of `FlexLoRAConfig`). Slow tests use the real offline models
(MiniLM-L6 with a BIG-bench task, SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ADAPTER_FILES, EXAMPLES, load_example
from helpers import sentences as _sentences
from transformers import HfArgumentParser, TrainingArguments

from flexlora_hf import FlexLoRAConfig
from flexlora_hf.integrations.arguments import HELP_FIELDS, FlexLoRAArguments, parse_max_rank, parse_module_list


def load_script(name: str) -> ModuleType:
    return load_example(name)

def _write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


# A schedule that fires within 12 optimizer steps: events on the Δ_T=2 grid in (2, 12 - 2].
SHORT_SCHEDULE = ["--r", "4", "--lora_alpha", "8", "--b0", "2", "--t_warmup", "2", "--t_final", "2", "--delta_t", "2"]
FAST_TRAINING = [
    "--max_steps",
    "12",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--learning_rate",
    "5e-3",
    "--logging_steps",
    "4",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--dataloader_pin_memory",
    "false",
]


def _assert_adapter_dir(out: Path) -> list[dict]:
    missing = [name for name in ADAPTER_FILES if not (out / name).is_file()]
    assert not missing, f"{out} lacks {missing}; has {sorted(p.name for p in out.iterdir())}"
    history = json.loads((out / "rank_history.json").read_text())
    assert history, "no reallocation event was recorded"
    assert any(event["prune"] or event["expand"] for event in history)
    return history


# ---------------------------------------------------------------------------------------------------- arguments
def test_flexlora_arguments_mirror_every_config_field():
    config_fields = {f.name for f in dataclasses.fields(FlexLoRAConfig)}
    arg_fields = {f.name for f in dataclasses.fields(FlexLoRAArguments)}
    assert arg_fields == (config_fields - {"seed"}) | {"flexlora_seed", "flexlora_config"}
    # defaults and help strings follow the config
    defaults = FlexLoRAArguments().to_flexlora_config()
    assert defaults == FlexLoRAConfig()


def test_flexlora_arguments_parse_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, FlexLoRAArguments))
    training_args, flexlora_args = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--seed",
            "7",
            "--r",
            "4",
            "--target_modules",
            "query, key,value",
            "--modules_to_save",
            "classifier,pooler",
            "--max_rank",
            "12",
            "--importance",
            "nuclear",
        ]
    )
    config = flexlora_args.to_flexlora_config(seed=training_args.seed)
    assert config.r == 4
    assert config.target_modules == ["query", "key", "value"]
    assert config.modules_to_save == ["classifier", "pooler"]
    assert config.max_rank == 12
    assert config.importance == "nuclear"
    assert config.seed == 7  # follows --seed unless --flexlora_seed is given
    _, flexlora_args = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--flexlora_seed", "3"])
    assert flexlora_args.to_flexlora_config(seed=7).seed == 3


def test_help_lists_the_flags_users_set_and_the_file_sets_the_rest(tmp_path):
    """--help shows the common flags and --flexlora_config; the other fields come from that file (or hidden flags).
    Precedence: flag > file > the config's default."""
    parser = HfArgumentParser((TrainingArguments, FlexLoRAArguments))
    shown = {a.dest for a in parser._actions if a.help != argparse.SUPPRESS} - {
        a.dest for a in HfArgumentParser(TrainingArguments)._actions
    }
    assert shown == set(HELP_FIELDS) | {"flexlora_config"}
    assert len(shown) <= 12
    help_text = parser.format_help()
    assert "--importance" not in help_text and "(default: 8)" in help_text and "(default: None)" not in help_text.split("--r R")[1][:200]

    file = tmp_path / "flexlora.json"
    file.write_text(json.dumps({"importance": "nuclear", "r": 4, "grace_events": 0, "target_modules": ["query"]}))
    argv = ["--output_dir", str(tmp_path), "--flexlora_config", str(file), "--r", "6", "--svd_prune", "false"]
    _, flexlora_args = parser.parse_args_into_dataclasses(argv)
    config = flexlora_args.to_flexlora_config(seed=5)
    assert (config.r, config.importance, config.grace_events, config.svd_prune) == (6, "nuclear", 0, False)
    assert config.target_modules == ["query"] and config.lora_alpha == FlexLoRAConfig.lora_alpha and config.seed == 5

    saved = tmp_path / "adapter"  # an adapter folder works as the file (its bookkeeping keys are skipped)
    FlexLoRAConfig(r=3, b0=2, allocation="prune_only").save_pretrained(saved)
    _, flexlora_args = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--flexlora_config", str(saved)])
    assert flexlora_args.to_flexlora_config() == FlexLoRAConfig(r=3, b0=2, allocation="prune_only")

    file.write_text(json.dumps({"importanse": "nuclear"}))
    with pytest.raises(ValueError, match="importanse"):
        flexlora_args.__class__(flexlora_config=str(file)).to_flexlora_config()
    with pytest.raises(ValueError, match="cannot read"):
        flexlora_args.__class__(flexlora_config=str(tmp_path / "missing.json")).to_flexlora_config()


def test_flexlora_arguments_reject_bad_values(tmp_path):
    parser = HfArgumentParser((TrainingArguments, FlexLoRAArguments))
    _, flexlora_args = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--importance", "magic"])
    with pytest.raises(ValueError, match="importance"):
        flexlora_args.to_flexlora_config()
    with pytest.raises(ValueError, match="max_rank"):
        parse_max_rank("twelve")


def test_module_list_syntax():
    assert parse_module_list("query,value") == ["query", "value"]
    assert parse_module_list("all-linear") == "all-linear"
    assert parse_module_list(r"re:.*\.(query|value)") == r".*\.(query|value)"
    assert parse_module_list("none") == []
    assert parse_module_list("") is None
    assert parse_module_list(["q", "v"]) == ["q", "v"]
    assert parse_max_rank('{"layer.0.query": 16}') == {"layer.0.query": 16}
    assert parse_max_rank(None) is None


# ---------------------------------------------------------------------------------------------------- run_glue
def _classifier_accuracy(base_dir: Path, adapter_dir: Path, rows: list[tuple[str, int]], max_length: int) -> float:
    """Accuracy of the saved adapter on top of its base, scoring `rows` one at a time (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flexlora_hf import FlexLoRAModel

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model = FlexLoRAModel.from_pretrained(base, str(adapter_dir)).eval()
    hits = 0
    with torch.no_grad():
        for text, label in rows:
            encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            hits += int(model(**encoded).logits.argmax(-1).item() == label)
    return hits / len(rows)


def test_run_glue_local_csv(tiny_bert_dir, tmp_path):
    train = _write_csv(tmp_path / "train.csv", _sentences(96, seed=1))
    dev_rows = _sentences(32, seed=2)
    dev = _write_csv(tmp_path / "dev.csv", dev_rows)
    out = tmp_path / "out"
    metrics = load_script("run_glue").main(
        [
            "--model_name_or_path",
            str(tiny_bert_dir),
            "--train_file",
            str(train),
            "--validation_file",
            str(dev),
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "32",
            "--output_dir",
            str(out),
            *FAST_TRAINING,
            *SHORT_SCHEDULE,
        ]
    )
    history = _assert_adapter_dir(out)
    assert history[-1]["ranks"] != {name: 4 for name in history[-1]["ranks"]}, "the rank map never changed"
    # The reported accuracy is the saved adapter's on the whole dev file.
    assert metrics["eval_samples"] == len(dev_rows)
    assert metrics["eval_accuracy"] == pytest.approx(_classifier_accuracy(tiny_bert_dir, out, dev_rows, 32))
    assert "eval_macro_f1" in metrics and "eval_loss" in metrics
    assert (out / "eval_results.json").is_file() and (out / "train_results.json").is_file()
    card = (out / "README.md").read_text()
    assert "FlexLoRA" in card or "flexlora" in card


def test_run_glue_json_config_glue_task_metrics_and_regression(tiny_bert_dir, tmp_path):
    """A .json holding every argument; --task_name stsb on local files gives GLUE's regression metrics."""
    rng = random.Random(3)
    rows = [
        {"sentence1": text, "sentence2": other, "label": round(rng.uniform(0, 5), 2)}
        for (text, _), (other, _) in zip(_sentences(64, seed=4), _sentences(64, seed=5), strict=True)
    ]
    train, dev = tmp_path / "train.json", tmp_path / "dev.json"
    train.write_text("\n".join(json.dumps(r) for r in rows[:48]))
    dev.write_text("\n".join(json.dumps(r) for r in rows[48:]))
    out = tmp_path / "out"
    args = {
        "model_name_or_path": str(tiny_bert_dir),
        "task_name": "stsb",
        "ignore_mismatched_sizes": True,  # the tiny checkpoint has a 2-label head, STS-B needs 1 output
        "train_file": str(train),
        "validation_file": str(dev),
        "do_train": True,
        "do_eval": True,
        "max_seq_length": 32,
        "output_dir": str(out),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "target_modules": "query,value,intermediate.dense",
        "r": 4,
        "b0": 1,
        "t_warmup": 2,
        "t_final": 2,
        "delta_t": 2,
    }
    config_path = tmp_path / "args.json"
    config_path.write_text(json.dumps(args))
    metrics = load_script("run_glue").main([str(config_path)])
    _assert_adapter_dir(out)
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(metrics)
    flexlora_config = json.loads((out / "flexlora_config.json").read_text())
    assert flexlora_config["target_modules"] == ["query", "value", "intermediate.dense"]
    assert flexlora_config["r"] == 4


def test_run_glue_rejects_two_data_sources(tmp_path):
    with pytest.raises(ValueError, match="only one data source"):
        load_script("run_glue").main(
            ["--model_name_or_path", "x", "--bigbench_task", "hyperbaton", "--dataset_name", "y", "--output_dir", "o"]
        )


# ---------------------------------------------------------------------------------------------------- GLUE recipes
TABLE_8 = {  # task: (max_seq_length, learning_rate, epochs, T_warmup, T_final, Delta_T), paper Appendix D
    "cola": (64, 8e-4, 20, 1000, 1000, 200),
    "mnli": (256, 5e-4, 12, 5000, 5000, 1000),
    "mrpc": (256, 1e-3, 30, 500, 500, 100),
    "rte": (512, 1.2e-3, 50, 500, 500, 100),
    "qnli": (256, 5e-4, 5, 1000, 1000, 200),
    "sst2": (256, 8e-4, 20, 5000, 5000, 1000),
    "stsb": (256, 2.2e-3, 20, 1000, 1000, 200),
    "qqp": (320, 8e-4, 5, 5000, 5000, 1000),
}


@pytest.mark.parametrize("task", sorted(TABLE_8))
def test_glue_recipe_matches_table_8(task, tmp_path):
    """The recipe's command line parses through run_glue's parser into the paper's hyper-parameters."""
    import subprocess

    argv_file = tmp_path / "argv.txt"
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\nshift\nprintf "%s\\n" "$@" > {argv_file}\n')  # drop the script path
    shim.chmod(0o755)
    recipe = EXAMPLES / "glue_recipes" / "run_glue_paper.sh"
    subprocess.run(
        ["bash", str(recipe), task, "--seed", "3"], check=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(shim)}
    )
    argv = argv_file.read_text().splitlines()
    model_args, data_args, training_args, flexlora_args = load_script("run_glue").parse_args(argv)
    config = flexlora_args.to_flexlora_config(seed=training_args.seed)
    max_len, lr, epochs, t_warmup, t_final, delta_t = TABLE_8[task]
    assert model_args.model_name_or_path == "microsoft/deberta-v3-base"
    assert data_args.task_name == task and data_args.max_seq_length == max_len
    assert training_args.learning_rate == pytest.approx(lr) and training_args.num_train_epochs == epochs
    assert training_args.per_device_train_batch_size == 32 and training_args.warmup_steps == pytest.approx(0.1)
    assert getattr(training_args.lr_scheduler_type, "value", None) == "linear"
    assert getattr(training_args.optim, "value", None) == "adamw_torch"
    assert (config.r, config.lora_alpha, config.b0) == (8, 16, 4)
    assert (config.t_warmup, config.t_final, config.delta_t) == (t_warmup, t_final, delta_t)
    assert config.target_modules == [
        "query_proj",
        "key_proj",
        "value_proj",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    assert training_args.seed == 3 and config.seed == 3  # extra arguments override the defaults


# ---------------------------------------------------------------------------------------------------- run_clm
def test_run_clm_local_text(tiny_llama_dir, tmp_path):
    lines = [text for text, _ in _sentences(300, seed=6)]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines[:260]) + "\n")
    dev = tmp_path / "valid.txt"
    dev.write_text("\n".join(lines[260:]) + "\n")
    out = tmp_path / "out"
    metrics = load_script("run_clm").main(
        [
            "--model_name_or_path",
            str(tiny_llama_dir),
            "--train_file",
            str(train),
            "--validation_file",
            str(dev),
            "--block_size",
            "32",
            "--do_train",
            "--do_eval",
            "--output_dir",
            str(out),
            "--target_modules",
            "q_proj,k_proj,v_proj,up_proj,down_proj",
            *FAST_TRAINING,
            *SHORT_SCHEDULE,
        ]
    )
    _assert_adapter_dir(out)
    assert metrics["perplexity"] > 1.0
    assert metrics["perplexity"] < 310  # better than uniform over the 300-token vocabulary + specials
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert all(
        name.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
        for name in peft_config["target_modules"]
    )


def test_run_clm_jsonl_holds_out_validation(tiny_llama_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": text}) for text, _ in _sentences(300, seed=7)))
    out = tmp_path / "out"
    metrics = load_script("run_clm").main(
        [
            "--model_name_or_path",
            str(tiny_llama_dir),
            "--train_file",
            str(train),
            "--validation_split_percentage",
            "10",
            "--block_size",
            "32",
            "--do_train",
            "--do_eval",
            "--output_dir",
            str(out),
            *FAST_TRAINING,
            *SHORT_SCHEDULE,
        ]
    )
    _assert_adapter_dir(out)
    assert metrics["eval_samples"] >= 1 and "perplexity" in metrics


# ---------------------------------------------------------------------------------------------------- quickstart
def test_quickstart_embedded_topics_load_as_classification_splits():
    """The quickstart's default data needs no download: the embedded file reads as 13-label splits, deterministically."""
    from flexlora_hf.data.bigbench import classification_from_task_json

    quickstart = load_script("quickstart")
    task_json = json.loads(quickstart.EMBEDDED_TASK.read_text())
    splits = classification_from_task_json(task_json, name="topics", validation_fraction=0.2, seed=42)
    names = splits["train"].features["label"].names
    assert len(names) == 13 and {"science", "sports", "coding"} <= set(names)
    n_train, n_val = len(splits["train"]), len(splits["validation"])
    assert n_train + n_val == len(task_json["examples"]) and n_val == round(0.2 * (n_train + n_val))
    assert len(set(splits["validation"]["label"])) >= 10  # every split sees most topics
    again = classification_from_task_json(task_json, name="topics", validation_fraction=0.2, seed=42)
    assert again["validation"]["text"] == splits["validation"]["text"]
    assert quickstart.parse_args([]).task == ""  # the embedded set is the default


def test_quickstart_schedule_and_rank_table():
    quickstart = load_script("quickstart")
    schedule = quickstart.schedule_for(150)
    assert schedule == {"t_warmup": 30, "t_final": 30, "delta_t": 7}
    FlexLoRAConfig(total_steps=150, **schedule).validate()  # a valid window
    assert quickstart.schedule_for(3) == {"t_warmup": 1, "t_final": 1, "delta_t": 1}
    ranks = {
        "bert.encoder.layer.0.attention.self.query": 9,
        "bert.encoder.layer.0.attention.self.key": 7,
        "bert.encoder.layer.1.attention.self.query": 8,
        "bert.encoder.layer.1.intermediate.dense": 10,
    }
    table = quickstart.rank_table(ranks).splitlines()
    assert table[0].split() == ["layer", "Q", "K", "I"]
    assert table[1].split() == ["L0", "9", "7", "-"]
    assert table[2].split() == ["L1", "8", "-", "10"]


# ---------------------------------------------------------------------------------------------------- slow: real models
@pytest.mark.slow
def test_run_glue_minilm_bigbench(tmp_path):
    from flexlora_hf.data.assets import minilm_path

    out = tmp_path / "out"
    metrics = load_script("run_glue").main(
        [
            "--model_name_or_path",
            str(minilm_path()),
            "--bigbench_task",
            "multiemo",
            "--bigbench_subtask",
            "all_sentence_en",
            "--bigbench_max_examples",
            "240",
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "64",
            "--output_dir",
            str(out),
            "--target_modules",
            "query,key,value,attention.output.dense,intermediate.dense,output.dense",
            "--modules_to_save",
            "classifier,pooler",
            *FAST_TRAINING,
            *SHORT_SCHEDULE,
        ]
    )
    history = _assert_adapter_dir(out)
    assert len(history[-1]["ranks"]) == 36  # 6 layers x 6 matrices
    correct = metrics["eval_accuracy"] * metrics["eval_samples"]  # a fraction of the held-out examples
    assert metrics["eval_samples"] > 0 and correct == pytest.approx(round(correct), abs=1e-6)


@pytest.mark.slow
def test_run_clm_smollm2(tmp_path):
    from flexlora_hf.data.assets import materialize_smollm2

    model_dir = materialize_smollm2()
    train = tmp_path / "train.txt"
    text = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    train.write_text(text * max(1, 40_000 // max(len(text), 1)))
    out = tmp_path / "out"
    metrics = load_script("run_clm").main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--train_file",
            str(train),
            "--block_size",
            "64",
            "--max_train_samples",
            "48",
            "--max_eval_samples",
            "8",
            "--do_train",
            "--do_eval",
            "--output_dir",
            str(out),
            "--target_modules",
            "q_proj,k_proj,v_proj,up_proj,down_proj",
            "--max_steps",
            "6",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "3e-4",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--dataloader_pin_memory",
            "false",
            "--b0",
            "2",
            "--t_warmup",
            "1",
            "--t_final",
            "1",
            "--delta_t",
            "2",
        ]
    )
    _assert_adapter_dir(out)
    assert metrics["perplexity"] < 1e4


@pytest.mark.slow
def test_quickstart_small(tmp_path, capsys):
    out = tmp_path / "quickstart"
    result = load_script("quickstart").main(
        ["--max_examples", "240", "--epochs", "1", "--output_dir", str(out), "--no_progress_bar"]
    )
    _assert_adapter_dir(out)
    assert result["events"] >= 1
    printed = capsys.readouterr().out
    assert "validation accuracy:" in printed and "rank_heatmap.png" in printed


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
