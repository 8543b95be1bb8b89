"""lm-eval integration: the `flexlora` model, evaluate_adapter, results tables, task configs, CLI and data helpers.

Fast tests use a tiny random Llama with a byte-level BPE tokenizer trained in a second, saved to a temporary folder;
the slow test scores the real SmolLM2-135M on the offline BIG-bench social_iqa task.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("lm_eval")

from helpers import load_example, tiny_llama  # noqa: E402

from flexlora_hf import FlexLoRAConfig  # noqa: E402
from flexlora_hf.integrations.evaluation import FlexLoRALM, evaluate_adapter, results_table  # noqa: E402
from flexlora_hf.integrations.tasks import TASKS_DIR  # noqa: E402
from flexlora_hf.integrations.tasks.utils import (  # noqa: E402
    LLM_ADAPTERS_DATASETS,
    bigbench_recipe_doc_to_choice,
    bigbench_recipe_doc_to_text,
    bigbench_to_commonsense,
    bigbench_train_eval_split,
    extract_llm_adapters_answer,
    llm_adapters_process_results,
    llm_adapters_prompt,
    llm_adapters_train_prompt,
    load_bigbench_eval,
    prepare_bigbench_eval_data,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "question answer choice true false yes no maybe",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: the correct answer is answer1 answer2 answer3 solution1 option1 ending1",
] * 20


# ---------------------------------------------------------------------------------------------- fixtures
def save_tiny_base(path: Path, seed: int = 0) -> str:
    """A tiny random Llama plus a byte-level BPE tokenizer trained on CORPUS, saved as a normal HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    model = tiny_llama(
        seed=seed,
        hidden=64,
        vocab_size=len(fast),
        eval_mode=False,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def trained_adapter(tiny_base, tmp_path_factory) -> str:
    """A FlexLoRA adapter trained for a few steps (with reallocation events) on the tiny base, saved."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from flexlora_hf.integrations.trainer import FlexLoRATrainer

    out = tmp_path_factory.mktemp("adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ids = [tokenizer(t)["input_ids"][:24] for t in CORPUS[:4]] * 8
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    cfg = FlexLoRAConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, b0=2, t_warmup=2, t_final=2, delta_t=2, orth_reg_weight=0.0
    )
    args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=1,
        max_steps=10,
        learning_rate=5e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=5,
    )
    trainer = FlexLoRATrainer(model=model, args=args, train_dataset=data, flexlora_config=cfg)
    trainer.train()
    fm = trainer.flexlora_model
    assert any(r["prune"] for r in fm.rank_history)
    fm.save_pretrained(str(out / "adapter"))
    return str(out / "adapter")


@pytest.fixture(scope="module")
def tiny_task_dir(tmp_path_factory) -> Path:
    """A 10-row local multiple-choice task (JSONL + YAML with an absolute data_files path)."""
    folder = tmp_path_factory.mktemp("tiny_task")
    rows = [
        {"question": f"the quick brown fox {i}", "choices": ["jumps over", "the lazy dog", "yes no"], "label": i % 3}
        for i in range(10)
    ]
    (folder / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {folder / 'tiny.jsonl'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
    return folder


def loglikelihoods(results) -> list[float]:
    return [resp[0][0] for sample in results["samples"]["tiny_mc"] for resp in sample["resps"]]


def recomputed_accuracy(results, task: str) -> tuple[float, float]:
    """(acc, acc_norm) recomputed from the logged samples of a multiple-choice task: is the most likely choice (by
    log-likelihood, and by log-likelihood per character of the choice) the document's `label`?"""
    hits, hits_norm = [], []
    for sample in results["samples"][task]:
        lls = torch.tensor([resp[0][0] for resp in sample["resps"]], dtype=torch.float64)
        lengths = torch.tensor([float(len(choice)) for choice in sample["doc"]["choices"]], dtype=torch.float64)
        gold = sample["doc"]["label"]
        hits.append(float(int(lls.argmax()) == gold))
        hits_norm.append(float(int((lls / lengths).argmax()) == gold))
    assert hits, f"no logged samples for {task}"
    return sum(hits) / len(hits), sum(hits_norm) / len(hits_norm)


# ---------------------------------------------------------------------------------------------- flexlora model
def test_flexlora_model_matches_stock_hf_with_exported_peft(tiny_base, trained_adapter, tiny_task_dir):
    """`--model flexlora adapter=<dir>` and stock `--model hf peft=<dir>` (the exported view) score identically."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ours = evaluate_adapter(tiny_base, trained_adapter, "tiny_mc", include_path=str(tiny_task_dir), log_samples=True)
    stock = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_base},peft={trained_adapter}",
        tasks=["tiny_mc"],
        device="cpu",
        batch_size=1,
        task_manager=TaskManager(include_path=str(tiny_task_dir), include_defaults=False),
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == stock["results"]["tiny_mc"][metric]
    torch.testing.assert_close(
        torch.tensor(loglikelihoods(ours)), torch.tensor(loglikelihoods(stock)), rtol=1e-5, atol=1e-5
    )

    base_only = evaluate_adapter(tiny_base, None, "tiny_mc", include_path=str(tiny_task_dir), log_samples=True)
    assert loglikelihoods(base_only) != pytest.approx(loglikelihoods(ours), abs=1e-4)  # the adapter does something


def test_flexlora_model_loads_a_peft_only_folder(tiny_base, trained_adapter, tiny_task_dir, tmp_path):
    """A folder holding only the exported PEFT view (adapter_config.json + adapter_model.safetensors) also works."""
    import shutil

    peft_only = tmp_path / "peft_only"
    peft_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(Path(trained_adapter) / name, peft_only / name)
    a = evaluate_adapter(
        tiny_base, trained_adapter, "tiny_mc", include_path=str(tiny_task_dir), log_samples=True, limit=4
    )
    b = evaluate_adapter(
        tiny_base, str(peft_only), "tiny_mc", include_path=str(tiny_task_dir), log_samples=True, limit=4
    )
    torch.testing.assert_close(torch.tensor(loglikelihoods(a)), torch.tensor(loglikelihoods(b)), rtol=1e-5, atol=1e-5)


def test_flexlora_model_4bit_base_from_model_args_string(tiny_base, trained_adapter, tiny_task_dir):
    """`load_in_4bit=True` in an lm-eval model_args string is handled by us (transformers 5.x would reject it)."""
    pytest.importorskip("bitsandbytes")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from flexlora_hf.adapter.layer import is_linear4bit

    results = simple_evaluate(
        model="flexlora",
        model_args=f"pretrained={tiny_base},adapter={trained_adapter},load_in_4bit=True",
        tasks=["tiny_mc"],
        device="cpu",
        batch_size=2,
        limit=4,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tiny_task_dir), include_defaults=False),
    )
    assert len(results["samples"]["tiny_mc"]) == 4
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(recomputed_accuracy(results, "tiny_mc")[0])
    # The 4-bit base really scored: its log-likelihoods are not the full-precision model's.
    full = evaluate_adapter(
        tiny_base, trained_adapter, "tiny_mc", include_path=str(tiny_task_dir), log_samples=True, limit=4
    )
    assert loglikelihoods(results) != pytest.approx(loglikelihoods(full), abs=1e-4)
    lm = FlexLoRALM(pretrained=tiny_base, adapter=trained_adapter, load_in_4bit="true", device="cpu")
    layers = [m for m in lm.model.modules() if is_linear4bit(m)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert sum(type(m).__name__ == "FlexLoRALayer" for m in lm.model.modules()) == 2 * len(TARGETS)


def test_flexlora_model_rejects_adapter_with_model_object(tiny_base):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="adapter"):
        FlexLoRALM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_base), adapter="somewhere")


# ---------------------------------------------------------------------------------------------- task configs
def test_shipped_task_configs_are_indexed():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {"flexlora_commonsense", "flexlora_llm_adapters"} <= set(manager.all_groups)
    expected = {f"flexlora_llm_adapters_{k}" for k in LLM_ADAPTERS_DATASETS}
    expected |= {"flexlora_bigbench_social_iqa", "flexlora_bigbench_strategyqa"}
    expected |= {"flexlora_bigbench_social_iqa_recipe", "flexlora_bigbench_strategyqa_recipe"}
    expected |= {"flexlora_bigbench_multiemo", "flexlora_bigbench_multiemo_recipe"}
    expected |= {"flexlora_bigbench_intent_recognition", "flexlora_bigbench_intent_recognition_recipe"}
    assert expected <= set(manager.all_tasks)
    import yaml

    group = yaml.safe_load((TASKS_DIR / "commonsense" / "flexlora_commonsense.yaml").read_text())
    assert group["task"] == [
        "boolq",
        "piqa",
        "social_iqa",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
    ]


def test_llm_adapters_task_end_to_end(tiny_base, trained_adapter, tmp_path):
    """Generation task over a local LLM-Adapters-format test.json (beam search, regex extraction, exact match)."""
    folder = tmp_path / "dataset" / "boolq"
    folder.mkdir(parents=True)
    rows = [
        {
            "instruction": f"Please answer the following question with true or false, question: is {i} even?\n\n"
            "Answer format: true/false",
            "input": "",
            "output": "the correct answer is true",
            "answer": "true" if i % 2 == 0 else "false",
        }
        for i in range(3)
    ]
    (folder / "test.json").write_text(json.dumps(rows))
    results = evaluate_adapter(
        tiny_base,
        trained_adapter,
        "flexlora_llm_adapters_boolq",
        log_samples=True,
        metadata={"data_dir": str(tmp_path / "dataset")},
    )
    task = results["results"]["flexlora_llm_adapters_boolq"]
    samples = results["samples"]["flexlora_llm_adapters_boolq"]
    assert len(samples) == 3
    assert task["exact_match,none"] == pytest.approx(sum(sample["exact_match"] for sample in samples) / 3)
    assert samples[0]["arguments"][0][0] == llm_adapters_prompt(rows[0]["instruction"])
    for sample in samples:  # the metric is exactly the protocol's extraction applied to the generation
        generated = sample["resps"][0][0]
        expected = float(extract_llm_adapters_answer("boolq", generated) == sample["doc"]["answer"])
        assert sample["exact_match"] == expected


def test_llm_adapters_task_without_data_says_where_to_put_it(tiny_base, monkeypatch):
    monkeypatch.delenv("FLEXLORA_HF_LLM_ADAPTERS_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="FLEXLORA_HF_LLM_ADAPTERS_DATA"):
        evaluate_adapter(tiny_base, None, "flexlora_llm_adapters_piqa")


# ---------------------------------------------------------------------------------------------- protocol helpers
def test_llm_adapters_prompts_are_the_protocol_strings():
    ind = " " * 16
    assert llm_adapters_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        f"\n\n{ind}### Instruction:\n{ind}Q?\n\n{ind}### Response:\n{ind}"
    )
    assert llm_adapters_train_prompt("Q?", "", "A") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
        f"\n\n{ind}### Instruction:\n{ind}Q?\n{ind}\n{ind}### Response:\n{ind}A"
    )
    assert llm_adapters_train_prompt("Q?", "ctx", "A").startswith(
        "Below is an instruction that describes a task, paired with an input"
    )
    assert llm_adapters_train_prompt("Q?", "", "A").startswith(llm_adapters_train_prompt("Q?", "", ""))


@pytest.mark.parametrize(
    ("dataset", "text", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, not true", "false"),
        ("piqa", "solution2 is better", "solution2"),
        ("social_i_qa", "answer3", "answer3"),
        ("ARC-Challenge", "the correct answer is answer4", "answer4"),
        ("hellaswag", "ending1", "ending1"),
        ("winogrande", "I think option2", "option2"),
        ("openbookqa", "no idea", ""),
        ("social_i_qa", "answer1 ### Response: answer2", "answer2"),  # text after the last "### Response:"
    ],
)
def test_answer_extraction(dataset, text, expected):
    assert extract_llm_adapters_answer(dataset, text) == expected


def test_process_results_exact_match():
    doc = {"dataset": "piqa", "answer": "solution1"}
    assert llm_adapters_process_results(doc, ["the correct answer is solution1"]) == {"exact_match": 1.0}
    assert llm_adapters_process_results(doc, ["solution2"]) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="Unknown LLM-Adapters dataset"):
        extract_llm_adapters_answer("mnli", "x")


def test_bigbench_to_commonsense_formats():
    rows = bigbench_to_commonsense(
        [
            {"question": "Why did  Tracy go?\n", "choices": ["a", "b", "c"], "label": 2},
            {"question": "Is frost common?", "choices": ["Yes", "No"], "label": 1},
        ]
    )
    assert rows[0] == {
        "instruction": "Please choose the correct answer to the question: Why did Tracy go?\n\n"
        "Answer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": "the correct answer is answer3",
        "answer": "answer3",
    }
    assert rows[1]["answer"] == "false" and rows[1]["instruction"].endswith("Answer format: true/false")
    assert extract_llm_adapters_answer("social_i_qa", rows[0]["output"]) == rows[0]["answer"]
    assert extract_llm_adapters_answer("boolq", rows[1]["output"]) == rows[1]["answer"]


@pytest.mark.parametrize(
    "record",
    [
        {"question": "Why did  Tracy go?\n", "choices": ["a", "b", "c"], "label": 2},
        {"question": "Is frost common?", "choices": ["Yes", "No"], "label": 1},
        {"question": "Is frost rare?", "choices": ["No", "Yes"], "label": 1},
    ],
)
def test_bigbench_recipe_task_scores_the_trained_answer(record):
    """The `_recipe` tasks: LLM-Adapters' evaluation prompt of the make_data.py row, and the gold choice continues it
    into exactly the trained output (`the correct answer is <answer>`)."""
    row = bigbench_to_commonsense([record])[0]
    context = bigbench_recipe_doc_to_text(record)
    choices = bigbench_recipe_doc_to_choice(record)
    assert context.startswith(llm_adapters_prompt(row["instruction"]))
    assert context + " " + choices[record["label"]] == llm_adapters_prompt(row["instruction"]) + row["output"]
    assert len(set(choices)) == len(record["choices"])
    assert all(extract_llm_adapters_answer("social_i_qa" if len(choices) > 2 else "boolq", c) == c for c in choices)


# ---------------------------------------------------------------------------------------------- BIG-bench data
def _social_archive(path: Path, n: int = 23) -> Path:
    examples = [
        {"input": f"the quick brown fox {i}?", "target_scores": {f"choice {j}": int(j == i % 3) for j in range(3)}}
        for i in range(n)
    ]
    data = json.dumps({"name": "social_iqa", "examples": examples}).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/social_iqa/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def toy_bigbench(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLEXLORA_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLEXLORA_HF_EVAL_DATA", raising=False)
    archive = _social_archive(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv("FLEXLORA_HF_BIGBENCH_ARCHIVE", str(archive))
    return archive


def test_bigbench_split_is_disjoint_and_eval_data_is_written(toy_bigbench, tmp_path):
    train, held = bigbench_train_eval_split("social_iqa")
    assert len(held) == 5 and len(train) == 18
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    written = prepare_bigbench_eval_data(tmp_path / "eval", ["social_iqa"], limit=3)
    lines = written["social_iqa"].read_text().splitlines()
    assert [json.loads(x) for x in lines] == held[:3]
    # default location, written on first use by the task loader
    ds = load_bigbench_eval("social_iqa")
    assert len(ds["test"]) == 5
    assert (tmp_path / "cache" / "eval_data" / "bigbench_social_iqa.jsonl").is_file()


def test_multiemo_reads_its_english_sentence_subtask(tmp_path, monkeypatch):
    labels = ["ambivalent", "positive", "negative", "neutral"]
    examples = [{"input": f"sentence {i}.", "target_scores": {c: int(j == i % 4) for j, c in enumerate(labels)}} for i in range(10)]
    files = {
        "multiemo/task.json": {"name": "multiemo", "description": "metadata only, examples live in subtasks"},
        "multiemo/all_sentence_en/task.json": {"name": "all_sentence_en", "examples": examples},
        "multiemo/all_text_en/task.json": {"name": "all_text_en", "examples": examples[:2]},
    }
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, obj in files.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("FLEXLORA_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLEXLORA_HF_BIGBENCH_ARCHIVE", str(archive))
    train, held = bigbench_train_eval_split("multiemo")
    assert (len(train), len(held)) == (8, 2) and held[1]["question"] == "sentence 5."
    row = bigbench_to_commonsense(held[1:])[0]
    assert "Answer1: ambivalent Answer2: positive Answer3: negative Answer4: neutral" in row["instruction"]
    assert row["answer"] == "answer2" and bigbench_recipe_doc_to_choice(held[1]) == [f"answer{i}" for i in range(1, 5)]


def test_offline_bigbench_task_scores(tiny_base, trained_adapter, toy_bigbench, tmp_path):
    prepare_bigbench_eval_data(tmp_path / "eval", ["social_iqa"])
    results = evaluate_adapter(
        tiny_base,
        trained_adapter,
        "flexlora_bigbench_social_iqa",
        metadata={"data_dir": str(tmp_path / "eval")},
        log_samples=True,
    )
    task = results["results"]["flexlora_bigbench_social_iqa"]
    acc, acc_norm = recomputed_accuracy(results, "flexlora_bigbench_social_iqa")
    assert task["acc,none"] == pytest.approx(acc) and task["acc_norm,none"] == pytest.approx(acc_norm)
    assert results["n-samples"]["flexlora_bigbench_social_iqa"]["effective"] == 5


# ---------------------------------------------------------------------------------------------- tables and CLI
def _fake_results() -> dict:
    return {
        "results": {
            "flexlora_llm_adapters": {"exact_match,none": 0.5, "alias": "group"},
            "flexlora_llm_adapters_piqa": {"exact_match,none": 0.8, "exact_match_stderr,none": 0.01},
            "flexlora_llm_adapters_boolq": {"exact_match,none": 0.7, "exact_match_stderr,none": "N/A"},
            "social_iqa": {"acc,none": 0.5, "acc_stderr,none": 0.02},
            "hellaswag": {"acc,none": 0.4, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.03},
        },
        "groups": {"flexlora_llm_adapters": {}},
        "n-samples": {"social_iqa": {"original": 1954, "effective": 100}},
    }


def test_results_table(tmp_path):
    markdown, summary = results_table(_fake_results(), name="FlexLoRA r=8", output_dir=tmp_path)
    assert list(summary["tasks"]) == [  # paper's column order; the group row is not a task
        "flexlora_llm_adapters_boolq",
        "flexlora_llm_adapters_piqa",
        "social_iqa",
        "hellaswag",
    ]
    assert summary["tasks"]["hellaswag"]["metric"] == "acc_norm"
    assert summary["tasks"]["social_iqa"]["n"] == 100
    assert summary["average"] == pytest.approx((70 + 80 + 50 + 60) / 4)
    first_lines = markdown.splitlines()[:3]
    assert first_lines[0] == "| Method | BoolQ | PIQA | SIQA | HellaS. | Avg. |"
    assert first_lines[2] == "| FlexLoRA r=8 | 70.0 | 80.0 | 50.0 | 60.0 | 65.0 |"
    assert (tmp_path / "results.md").read_text() == markdown
    assert json.loads((tmp_path / "results.json").read_text())["average"] == pytest.approx(65.0)
    _, acc_only = results_table(_fake_results(), metric="acc")
    assert list(acc_only["tasks"]) == ["social_iqa", "hellaswag"]


def test_cli_eval_prints_and_writes_table(tiny_base, trained_adapter, tiny_task_dir, tmp_path, capsys):
    from flexlora_hf.integrations.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--base",
            tiny_base,
            "--adapter",
            trained_adapter,
            "--tasks",
            "tiny_mc",
            "--include_path",
            str(tiny_task_dir),
            "--limit",
            "4",
            "--device",
            "cpu",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Method | tiny_mc | Avg. |" in printed
    assert {"results.md", "results.json", "lm_eval_results.json"} <= {p.name for p in out.iterdir()}


def test_cli_prepare_bigbench(toy_bigbench, tmp_path, capsys):
    from flexlora_hf.integrations.cli import main

    assert main(["prepare-bigbench", "--out_dir", str(tmp_path / "d"), "--tasks", "social_iqa", "--limit", "2"]) == 0
    assert len((tmp_path / "d" / "bigbench_social_iqa.jsonl").read_text().splitlines()) == 2


def test_python_m_evaluation_forwards_to_lm_eval(tiny_base, trained_adapter, tiny_task_dir, tmp_path):
    """`python -m flexlora_hf.integrations.evaluation` is lm-eval's CLI with the `flexlora` model registered."""
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexlora_hf.integrations.evaluation",
            "--model",
            "flexlora",
            "--model_args",
            f"pretrained={tiny_base},adapter={trained_adapter}",
            "--tasks",
            "tiny_mc",
            "--include_path",
            str(tiny_task_dir),
            "--device",
            "cpu",
            "--limit",
            "3",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout
    assert list(out.rglob("results_*.json"))


# ---------------------------------------------------------------------------------------------- commonsense example
def test_commonsense_example_end_to_end_on_cpu(tiny_base, toy_bigbench, tmp_path):
    """make_data.py -> finetune.py (4-bit base, evaluation mid-run, reallocation) -> scored on the held-out rows."""
    finetune, make_data = load_example("commonsense/finetune"), load_example("commonsense/make_data")
    pytest.importorskip("bitsandbytes")

    data = make_data.main(["--output", str(tmp_path / "train.json"), "--tasks", "social_iqa"])
    rows = json.loads(Path(data).read_text())
    assert len(rows) == 18 and rows[0]["output"] == f"the correct answer is {rows[0]['answer']}"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    example = finetune.tokenize_row(rows[0], tokenizer, 256, train_on_inputs=False)
    n_prompt = len(tokenizer(llm_adapters_train_prompt(rows[0]["instruction"], "", ""))["input_ids"])
    assert (
        example["labels"][:n_prompt] == [-100] * n_prompt
        and example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    )
    assert example["input_ids"][-1] == tokenizer.eos_token_id

    out = finetune.main(
        [
            "--model_name_or_path",
            tiny_base,
            "--load_in_4bit",
            "--data_path",
            data,
            "--output_dir",
            str(tmp_path / "ft"),
            "--val_set_size",
            "4",
            "--r",
            "2",
            "--b0",
            "2",
            "--t_warmup",
            "2",
            "--t_final",
            "2",
            "--delta_t",
            "2",
            "--max_steps",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "3",
            "--logging_steps",
            "1",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--learning_rate",
            "1e-2",
            "--disable_tqdm",
            "true",
        ]
    )
    names = {p.name for p in Path(out).iterdir()}
    assert {"flexlora_config.json", "adapter_config.json", "rank_history.json", "eval_results.json"} <= names
    history = json.loads((Path(out) / "rank_history.json").read_text())
    assert any(r["prune"] for r in history)
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e][:2] == [3, 6]

    prepare_bigbench_eval_data(tmp_path / "eval", ["social_iqa"])
    results = evaluate_adapter(
        tiny_base, out, "flexlora_bigbench_social_iqa", load_in_4bit=True, metadata={"data_dir": str(tmp_path / "eval")}
    )
    assert results["n-samples"]["flexlora_bigbench_social_iqa"]["effective"] == 5


def test_commonsense_example_lora_baseline_on_cpu(tiny_base, toy_bigbench, tmp_path):
    """finetune.py --baseline lora: a PEFT LoRA at FlexLoRA's budget (same r, alpha, dropout, modules) on the 4-bit
    base, saved as a PEFT folder that lm-eval scores; gradients still flow after the mid-run evaluation."""
    finetune, make_data = load_example("commonsense/finetune"), load_example("commonsense/make_data")
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    data = make_data.main(["--output", str(tmp_path / "train.json"), "--tasks", "social_iqa"])
    argv = [
        "--model_name_or_path", tiny_base, "--load_in_4bit", "--data_path", data, "--output_dir", str(tmp_path / "ft"),
        "--val_set_size", "4", "--r", "2", "--lora_alpha", "8", "--lora_dropout", "0.05",
        "--target_modules", "q_proj,v_proj,down_proj", "--b0", "2", "--t_warmup", "2", "--t_final", "2",
        "--delta_t", "2", "--max_steps", "6", "--per_device_train_batch_size", "4", "--eval_strategy", "steps",
        "--eval_steps", "3", "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--learning_rate", "1e-2", "--disable_tqdm", "true", "--baseline", "lora",
    ]  # fmt: skip
    out = Path(finetune.main(argv))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "eval_results.json"} <= names
    assert not {"flexlora_config.json", "rank_history.json"} & names  # a plain PEFT adapter, no FlexLoRA files
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 2, 8, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert len(lora_b) == 3 * 2 and all(t.abs().sum() > 0 for t in lora_b)  # 2 layers x 3 modules, all trained
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in logs if "eval_loss" in e][:2] == [3, 6]
    after_eval = [e["grad_norm"] for e in logs if "grad_norm" in e and e["step"] > 3]
    assert len(after_eval) == 3 and min(after_eval) > 0  # the bitsandbytes CPU guard covers PEFT LoRA too

    prepare_bigbench_eval_data(tmp_path / "eval", ["social_iqa"])
    tasks = ["flexlora_bigbench_social_iqa_recipe", "flexlora_bigbench_social_iqa"]
    results = evaluate_adapter(
        tiny_base, str(out), tasks, load_in_4bit=True, metadata={"data_dir": str(tmp_path / "eval")}, log_samples=True
    )
    assert all(results["n-samples"][t]["effective"] == 5 for t in tasks)
    sample = results["samples"]["flexlora_bigbench_social_iqa_recipe"][0]
    assert sample["arguments"][0][0].endswith("the correct answer is")
    assert [a[1] for a in sample["arguments"]] == [" answer1", " answer2", " answer3"]


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_offline_bigbench_social_iqa(tmp_path):
    """SmolLM2-135M (real weights, offline) on the held-out BIG-bench social_iqa rows through the `flexlora` model."""
    from flexlora_hf.data.assets import materialize_smollm2

    try:
        base = str(materialize_smollm2())
    except ImportError as err:
        pytest.skip(str(err))
    try:
        prepare_bigbench_eval_data(tmp_path / "eval", ["social_iqa"], limit=20)
    except Exception as err:  # noqa: BLE001 - no archive and no PyPI access
        pytest.skip(f"BIG-bench archive unavailable: {err}")
    start = time.perf_counter()
    results = evaluate_adapter(
        base, None, "flexlora_bigbench_social_iqa", batch_size=4, metadata={"data_dir": str(tmp_path / "eval")}
    )
    elapsed = time.perf_counter() - start
    markdown, summary = results_table(results, name="SmolLM2-135M (base)", output_dir=tmp_path)
    print(markdown, f"{elapsed:.1f} s")  # noqa: T201 - shown with -s
    task = summary["tasks"]["flexlora_bigbench_social_iqa"]
    assert task["n"] == 20
    assert task["value"] >= 20.0  # 3 choices: chance is 33%; the notes measured ~47% acc_norm on 300 rows
