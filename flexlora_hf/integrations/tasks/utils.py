"""Python behind flexlora_hf's lm-eval task YAMLs, and the data helpers they share with the commonsense example.

This module owns:

* the **LLM-Adapters protocol** (the paper's Table 2 follows it): the Alpaca-style prompts of LLM-Adapters'
  `finetune.py` (training, [`llm_adapters_train_prompt`]) and `commonsense_evaluate.py` (evaluation,
  [`llm_adapters_prompt`]) reproduced character for character (indentation included: the protocol's prompts carry
  the 16-space indentation of the original source, and the two differ slightly), the per-dataset answer regexes
  ([`extract_llm_adapters_answer`]) and the `custom_dataset` loaders over the local LLM-Adapters test files;
* the **offline BIG-bench tasks**: a fixed, documented train/eval split of BIG-bench rows
  ([`bigbench_train_eval_split`]: every 5th row is held out for evaluation), [`prepare_bigbench_eval_data`] writing
  the eval rows as JSONL, the `custom_dataset` loaders reading them, and [`bigbench_to_commonsense`] turning the train
  rows into the LLM-Adapters commonsense_170k format (`answer1`, ... / `true`/`false` answers), and the
  `doc_to_text` / `doc_to_choice` of the `_recipe` tasks that score the held-out rows in that same format.

Data locations (lm-eval YAML cannot expand environment variables or resolve paths relative to the YAML, so the
`custom_dataset` functions below resolve them at run time; each also accepts `data_dir=` through lm-eval's
`--metadata '{"data_dir": ...}'` / `TaskManager(metadata=...)`):

* LLM-Adapters test files: `$FLEXLORA_HF_LLM_ADAPTERS_DATA/<dataset>/test.json`, i.e. point the variable at the
  `dataset/` folder of a LLM-Adapters checkout (`boolq`, `piqa`, `social_i_qa`, `hellaswag`, `winogrande`,
  `ARC-Challenge`, `ARC-Easy`, `openbookqa`).
* BIG-bench eval rows: `$FLEXLORA_HF_EVAL_DATA/bigbench_<task>.jsonl`, default
  `~/.cache/flexlora_hf/eval_data/` (under `$FLEXLORA_HF_CACHE` when set); written on first use from the BIG-bench
  archive (see `flexlora_hf.data.bigbench`) when missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...constants import cache_root

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ LLM-Adapters
LLM_ADAPTERS_DATA_ENV = "FLEXLORA_HF_LLM_ADAPTERS_DATA"

_ANSWER_CHOICES = r"answer1|answer2|answer3|answer4|answer5"
#: lm-eval task suffix -> (LLM-Adapters dataset folder, answer regex of commonsense_evaluate.py)
LLM_ADAPTERS_DATASETS: dict[str, tuple[str, str]] = {
    "boolq": ("boolq", r"true|false"),
    "piqa": ("piqa", r"solution1|solution2"),
    "social_i_qa": ("social_i_qa", _ANSWER_CHOICES),
    "hellaswag": ("hellaswag", r"ending1|ending2|ending3|ending4"),
    "winogrande": ("winogrande", r"option1|option2"),
    "arc_easy": ("ARC-Easy", _ANSWER_CHOICES),
    "arc_challenge": ("ARC-Challenge", _ANSWER_CHOICES),
    "openbookqa": ("openbookqa", _ANSWER_CHOICES),
}

_IND = " " * 16  # the protocol's prompts keep the indentation of the f-strings they were written in
_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_INTRO_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def llm_adapters_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - the protocol's name
    """The evaluation prompt of LLM-Adapters' `commonsense_evaluate.py` (the model continues after it)."""
    if input:
        return (
            f"{_INTRO_INPUT}\n\n{_IND}### Instruction:\n{_IND}{instruction}\n\n{_IND}### Input:\n{_IND}{input}\n\n"
            f"{_IND}### Response:\n{_IND}"
        )
    return f"{_INTRO} \n\n{_IND}### Instruction:\n{_IND}{instruction}\n\n{_IND}### Response:\n{_IND}"


def llm_adapters_train_prompt(instruction: str, input: str | None = None, output: str = "") -> str:  # noqa: A002
    """The training prompt of LLM-Adapters' `finetune.py`; with `output=""` it is the prompt part to mask."""
    if input:
        return (
            f"{_INTRO_INPUT} \n\n{_IND}### Instruction:\n{_IND}{instruction}\n{_IND}\n{_IND}### Input:\n{_IND}{input}\n"
            f"{_IND}\n{_IND}### Response:\n{_IND}{output}"
        )
    return f"{_INTRO}  \n\n{_IND}### Instruction:\n{_IND}{instruction}\n{_IND}\n{_IND}### Response:\n{_IND}{output}"


def extract_llm_adapters_answer(dataset: str, text: str) -> str:
    """The first answer token found in a generation (LLM-Adapters: text after the last "### Response:", stripped).

    Args:
        dataset (`str`): a key of `LLM_ADAPTERS_DATASETS` or an LLM-Adapters folder name (e.g. `"ARC-Easy"`).
        text (`str`): the generated continuation (or the whole decoded sequence).

    Returns:
        `str`: e.g. `"answer2"`, or `""` when nothing matches.
    """
    pattern = _answer_pattern(dataset)
    found = re.findall(pattern, text.split("### Response:")[-1].strip())
    return found[0] if found else ""


def _answer_pattern(dataset: str) -> str:
    if dataset in LLM_ADAPTERS_DATASETS:
        return LLM_ADAPTERS_DATASETS[dataset][1]
    for folder, pattern in LLM_ADAPTERS_DATASETS.values():
        if folder == dataset:
            return pattern
    raise ValueError(f"Unknown LLM-Adapters dataset {dataset!r}; known: {', '.join(LLM_ADAPTERS_DATASETS)}.")


def llm_adapters_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding `<dataset>/test.json` (LLM-Adapters' `dataset/`): `data_dir`, else
    `$FLEXLORA_HF_LLM_ADAPTERS_DATA`."""
    value = data_dir or os.environ.get(LLM_ADAPTERS_DATA_ENV)
    if not value:
        raise FileNotFoundError(
            "The flexlora_llm_adapters_* tasks read LLM-Adapters' test files: set "
            f"{LLM_ADAPTERS_DATA_ENV}=/path/to/LLM-Adapters/dataset (the folder with boolq/test.json, "
            'piqa/test.json, ...), or pass --metadata \'{"data_dir": "/path/to/LLM-Adapters/dataset"}\' to lm-eval.'
        )
    return Path(value).expanduser()


def load_llm_adapters_test(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """Load one LLM-Adapters test set as `DatasetDict({"test": ...})` with a `dataset` column for the scorer."""
    from datasets import Dataset, DatasetDict

    folder, _ = LLM_ADAPTERS_DATASETS[name]
    path = llm_adapters_data_dir(data_dir) / folder / "test.json"
    if not path.is_file():
        raise FileNotFoundError(f"LLM-Adapters test file not found: {path} (expected <data_dir>/{folder}/test.json).")
    with path.open(encoding="utf-8") as f:
        rows = json.load(f)
    records = [
        {
            "instruction": str(r["instruction"]),
            "input": str(r.get("input") or ""),
            "answer": str(r["answer"]),
            "dataset": name,
        }
        for r in rows
    ]
    return DatasetDict({"test": Dataset.from_list(records)})


def _llm_adapters_loader(name: str) -> Callable[..., DatasetDict]:
    def load(data_dir: str | None = None, **_: Any) -> DatasetDict:
        return load_llm_adapters_test(name, data_dir)

    load.__name__ = f"load_llm_adapters_{name}"
    load.__doc__ = f"lm-eval `custom_dataset` for LLM-Adapters {LLM_ADAPTERS_DATASETS[name][0]}/test.json."
    return load


load_llm_adapters_boolq = _llm_adapters_loader("boolq")
load_llm_adapters_piqa = _llm_adapters_loader("piqa")
load_llm_adapters_social_i_qa = _llm_adapters_loader("social_i_qa")
load_llm_adapters_hellaswag = _llm_adapters_loader("hellaswag")
load_llm_adapters_winogrande = _llm_adapters_loader("winogrande")
load_llm_adapters_arc_easy = _llm_adapters_loader("arc_easy")
load_llm_adapters_arc_challenge = _llm_adapters_loader("arc_challenge")
load_llm_adapters_openbookqa = _llm_adapters_loader("openbookqa")


def llm_adapters_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval `doc_to_text`: the evaluation prompt. LLM-Adapters evaluates without the input field."""
    return llm_adapters_prompt(doc["instruction"])


def llm_adapters_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval `process_results`: exact match of the extracted answer with `doc["answer"]`."""
    predicted = extract_llm_adapters_answer(doc["dataset"], results[0])
    return {"exact_match": float(predicted == doc["answer"])}


# ------------------------------------------------------------------------------------------------ BIG-bench
EVAL_DATA_ENV = "FLEXLORA_HF_EVAL_DATA"
BIGBENCH_EVAL_TASKS: tuple[str, ...] = ("social_iqa", "strategyqa")
#: tasks with an lm-eval config here (`flexlora_bigbench_<task>[_recipe]`), and the subtask folder each one reads
BIGBENCH_SUBTASKS: dict[str, str | None] = {
    "social_iqa": None,
    "strategyqa": None,
    "multiemo": "all_sentence_en",
    "intent_recognition": None,
}
#: most options of a non-yes/no question in the recipe format (`answer1` ... `answer9`: one digit per answer token)
MAX_RECIPE_CHOICES = 9
#: every `HOLDOUT_EVERY`-th row (index 0, 5, 10, ...) of a BIG-bench task is evaluation data, the rest training data
HOLDOUT_EVERY = 5


def default_eval_data_dir() -> Path:
    """`$FLEXLORA_HF_EVAL_DATA`, else `<cache>/eval_data` with `<cache>` = `$FLEXLORA_HF_CACHE` or
    `~/.cache/flexlora_hf`."""
    if os.environ.get(EVAL_DATA_ENV):
        return Path(os.environ[EVAL_DATA_ENV]).expanduser()
    return cache_root() / "eval_data"


def bigbench_eval_path(task: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the eval JSONL of a BIG-bench task: `<data_dir or default_eval_data_dir()>/bigbench_<task>.jsonl`."""
    directory = Path(data_dir).expanduser() if data_dir else default_eval_data_dir()
    return directory / f"bigbench_{task}.jsonl"


def bigbench_train_eval_split(
    task: str, *, archive: str | os.PathLike[str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a BIG-bench multiple-choice task into disjoint (train, eval) records, deterministically.

    Eval rows are those at positions 0, 5, 10, ... of `load_bigbench_multiple_choice(task)` (archive order), the
    rest are training rows, so an adapter trained on the train part is never scored on its own training data.

    Returns:
        `tuple[list[dict], list[dict]]`: records `{"question", "choices", "label"}`.
    """
    from flexlora_hf.data.bigbench import load_bigbench_multiple_choice

    records = load_bigbench_multiple_choice(
        task, archive=Path(archive) if archive is not None else None, subtask=BIGBENCH_SUBTASKS.get(task)
    )
    train = [r for i, r in enumerate(records) if i % HOLDOUT_EVERY != 0]
    held = [r for i, r in enumerate(records) if i % HOLDOUT_EVERY == 0]
    return train, held


def prepare_bigbench_eval_data(
    out_dir: str | os.PathLike[str] | None = None,
    tasks: Iterable[str] = BIGBENCH_EVAL_TASKS,
    limit: int | None = None,
    *,
    archive: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write the held-out eval rows of BIG-bench tasks as `bigbench_<task>.jsonl`, for the offline lm-eval tasks.

    Args:
        out_dir (`str` or `os.PathLike`, *optional*): destination; defaults to [`default_eval_data_dir`], which is
            where the `flexlora_bigbench_*` tasks look (otherwise pass `data_dir` in lm-eval's metadata or set
            `FLEXLORA_HF_EVAL_DATA`).
        tasks (`Iterable[str]`, *optional*): BIG-bench task names, default `social_iqa` and `strategyqa`.
        limit (`int`, *optional*): keep only the first `limit` eval rows of each task.
        archive (`str` or `os.PathLike`, *optional*): BIG-bench archive (see `flexlora_hf.data.bigbench`).

    Returns:
        `dict[str, Path]`: task -> written file (one `{"question", "choices", "label"}` object per line).
    """
    directory = Path(out_dir).expanduser() if out_dir is not None else default_eval_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task in tasks:
        _, held = bigbench_train_eval_split(task, archive=archive)
        if limit is not None:
            held = held[:limit]
        path = bigbench_eval_path(task, directory)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in held:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        written[task] = path
        logger.info("Wrote %d %s eval rows to %s", len(held), task, path)
    return written


def load_bigbench_eval(task: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """The eval rows of a BIG-bench task as `DatasetDict({"test": ...})`; written from the archive if missing."""
    from datasets import Dataset, DatasetDict

    path = bigbench_eval_path(task, data_dir)
    if not path.is_file():
        logger.info("%s not found; writing it from the BIG-bench archive.", path)
        prepare_bigbench_eval_data(path.parent, [task])
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_bigbench_social_iqa(data_dir: str | None = None, **_: Any) -> DatasetDict:
    """lm-eval `custom_dataset` of `flexlora_bigbench_social_iqa`."""
    return load_bigbench_eval("social_iqa", data_dir)


def load_bigbench_strategyqa(data_dir: str | None = None, **_: Any) -> DatasetDict:
    """lm-eval `custom_dataset` of `flexlora_bigbench_strategyqa`."""
    return load_bigbench_eval("strategyqa", data_dir)


def load_bigbench_multiemo(data_dir: str | None = None, **_: Any) -> DatasetDict:
    """lm-eval `custom_dataset` of `flexlora_bigbench_multiemo` (English sentence-level sentiment, 4 classes)."""
    return load_bigbench_eval("multiemo", data_dir)


def load_bigbench_intent_recognition(data_dir: str | None = None, **_: Any) -> DatasetDict:
    """lm-eval `custom_dataset` of `flexlora_bigbench_intent_recognition` (intent of an utterance, 7 classes)."""
    return load_bigbench_eval("intent_recognition", data_dir)


def _is_yes_no(choices: Sequence[str]) -> bool:
    return [c.lower() for c in choices] in (["yes", "no"], ["no", "yes"])


def bigbench_to_commonsense(records: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Turn multiple-choice records into LLM-Adapters commonsense_170k rows `{instruction, input, output, answer}`.

    Yes/No questions (e.g. strategyqa) take the BoolQ form (answers `true`/`false`); other questions take the
    Social IQa form, `Answer1: ... Answer2: ...` with answers `answer1`, `answer2`, ... (at most 9 choices, so
    that every answer token is `answer` + one digit; LLM-Adapters' own datasets have at most 5, and its regexes stop
    there, but the `_recipe` tasks score these tokens by log-likelihood, not by regex).
    """
    rows: list[dict[str, str]] = []
    for record in records:
        question = " ".join(str(record["question"]).split())
        choices = [str(c) for c in record["choices"]]
        label = int(record["label"])
        if _is_yes_no(choices):
            answer = "true" if choices[label].lower() == "yes" else "false"
            instruction = (
                f"Please answer the following question with true or false, question: {question}\n\n"
                "Answer format: true/false"
            )
        else:
            if len(choices) > MAX_RECIPE_CHOICES:
                raise ValueError(
                    f"bigbench_to_commonsense: {len(choices)} choices; the format allows at most {MAX_RECIPE_CHOICES}."
                )
            options = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(choices))
            formats = "/".join(f"answer{i + 1}" for i in range(len(choices)))
            answer = f"answer{label + 1}"
            instruction = (
                f"Please choose the correct answer to the question: {question}\n\n{options}\n\nAnswer format: {formats}"
            )
        rows.append(
            {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
        )
    return rows


def bigbench_recipe_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval `doc_to_text` of `flexlora_bigbench_<task>_recipe`: a held-out row in the commonsense recipe's format.

    The row as [`bigbench_to_commonsense`] (and so `make_data.py`) writes it, in LLM-Adapters' evaluation prompt,
    continued up to the answer token: `... ### Response:\n<indent>the correct answer is`. The choices
    ([`bigbench_recipe_doc_to_choice`]) are the answer tokens the recipe trains, so this scores what an adapter
    trained by `examples/commonsense/finetune.py` learned, by log-likelihood instead of generation.
    """
    instruction = bigbench_to_commonsense([doc])[0]["instruction"]
    return llm_adapters_prompt(instruction) + "the correct answer is"


def bigbench_recipe_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """lm-eval `doc_to_choice` of `flexlora_bigbench_<task>_recipe`: `answer1`, ... or `true`/`false`, in order."""
    choices = [str(c) for c in doc["choices"]]
    if _is_yes_no(choices):
        return ["true" if c.lower() == "yes" else "false" for c in choices]
    return [f"answer{i + 1}" for i in range(len(choices))]


__all__ = [
    "BIGBENCH_EVAL_TASKS",
    "EVAL_DATA_ENV",
    "LLM_ADAPTERS_DATASETS",
    "LLM_ADAPTERS_DATA_ENV",
    "bigbench_eval_path",
    "bigbench_recipe_doc_to_choice",
    "bigbench_recipe_doc_to_text",
    "bigbench_to_commonsense",
    "bigbench_train_eval_split",
    "default_eval_data_dir",
    "extract_llm_adapters_answer",
    "llm_adapters_doc_to_text",
    "llm_adapters_process_results",
    "llm_adapters_prompt",
    "llm_adapters_train_prompt",
    "load_bigbench_eval",
    "load_llm_adapters_test",
    "prepare_bigbench_eval_data",
]
