"""Model cards for FlexLoRA adapters.

This module owns [`build_model_card`]: the Hub metadata (`library_name: peft`, `base_model`, tags, pipeline tag,
datasets, metrics, optional `model-index`) and the body rendered from the Jinja2 template shipped in the package
(`flexlora_hf/templates/flexlora_template.md`, read with `importlib.resources`; `model_cards/flexlora_template.md` in
the repository is an identical copy for readers). The body explains what entropy-guided FlexLoRA is, how to load
the adapter with plain PEFT and with flexlora_hf, shows the rank map as a layer x module-type table next to the
rank heatmap, the parameter budget against a fixed-rank LoRA of the same total rank, and the hyper-parameters.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..constants import HEATMAP_NAME, RANK_HISTORY_NAME, __version__
from .peft_view import base_model_name_or_path, infer_task_type, is_local_path
from .plotting import depth_order, short_module_types, split_module_path

if TYPE_CHECKING:
    from ..adapter.model import FlexLoRAModel

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "flexlora_template.md"

_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# TrainingArguments has ~120 fields; the card shows the ones that define a run.
_TRAINING_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "seed",
    "bf16",
    "fp16",
    "gradient_checkpointing",
)


def load_template() -> str:
    """The model card template shipped inside the package."""
    return (importlib.resources.files("flexlora_hf") / "templates" / TEMPLATE_NAME).read_text(encoding="utf-8")


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rank_tables(rank_map: Mapping[str, int]) -> tuple[str, str]:
    """Markdown tables of a rank map: (layers x module types, other adapted matrices).

    Rows are the layer index (prefixed with the stack, e.g. `encoder.block`, when the model has several stacks),
    columns the module type shortened to the fewest trailing path components that keep types apart (`q_proj`,
    `self.query`, ...), and a total per layer. Matrices without a layer index go to the second table (may be "").
    """
    names = depth_order(list(rank_map))
    layered = [(n, *split_module_path(n)) for n in names]
    indexed = [(n, prefix, idx, rest) for n, prefix, idx, rest in layered if idx is not None]
    others = [n for n, _, idx, _ in layered if idx is None]
    main = ""
    if indexed:
        labels = short_module_types([rest for *_, rest in indexed])
        columns = list(dict.fromkeys(labels[rest] for *_, rest in indexed))
        prefixes = list(dict.fromkeys(prefix for _, prefix, _, _ in indexed))
        cells: dict[tuple[str, int], dict[str, int]] = {}
        for name, prefix, idx, rest in indexed:
            assert idx is not None
            cells.setdefault((prefix, idx), {})[labels[rest]] = int(rank_map[name])
        rows = []
        for (prefix, idx), by_type in cells.items():
            label = str(idx) if len(prefixes) == 1 else f"{prefix}.{idx}"
            rows.append([label, *[by_type.get(c, "–") for c in columns], sum(by_type.values())])
        main = _table(["layer", *columns, "total"], rows)
    other = _table(["module", "rank"], [[n, int(rank_map[n])] for n in others]) if others else ""
    return main, other


def _budget_table(model: FlexLoRAModel) -> str:
    layers = list(model.flexlora_layers())
    n = len(layers)
    total = sum(layer.rank for _, layer in layers)
    sizes = sum(layer.in_features + layer.out_features for _, layer in layers)
    flex_lora = sum(layer.rank * (layer.in_features + layer.out_features + 1) for _, layer in layers)
    peft_view = sum(layer.rank * (layer.in_features + layer.out_features) for _, layer in layers)
    active, allocated, all_params = model.trainable_parameter_counts()
    mean_rank = total / n if n else 0.0
    fixed = round(mean_rank * sizes)
    rows: list[list[Any]] = [
        ["adapted matrices", n],
        ["total rank", f"{total} (initial: r = {model.flexlora_config.r} per matrix = {model.flexlora_config.r * n})"],
        ["FlexLoRA adapter parameters (P, λ, Q at the final ranks)", f"{flex_lora:,}"],
        [
            f"fixed-rank LoRA with the same total rank (r = {mean_rank:g} per matrix)",
            f"{fixed:,}",
        ],
        ["exported PEFT LoRA parameters (λ folded into lora_B)", f"{peft_view:,}"],
        [
            "active trainable parameters incl. modules_to_save",
            f"{active:,} ({100 * active / max(all_params, 1):.4f}% of {all_params:,})",
        ],
        ["allocated during training incl. spare rank slots", f"{allocated:,}"],
    ]
    return _table(["", "value"], rows)


def _training_rows(training_args: Any) -> list[list[Any]]:
    if isinstance(training_args, Mapping):
        items = dict(training_args)
        keys: Iterable[str] = items
    else:
        to_dict = getattr(training_args, "to_dict", None)
        items = to_dict() if callable(to_dict) else dict(vars(training_args))
        keys = [k for k in _TRAINING_KEYS if k in items]
    rows: list[list[Any]] = []
    for key in keys:
        value = items[key]
        if value is None or isinstance(value, (Mapping, list, tuple)) and not value:
            continue
        rows.append([key, getattr(value, "value", value)])  # enums (lr_scheduler_type, optim) by value
    return rows


def _eval_table(eval_results: Any) -> str:
    if isinstance(eval_results, Mapping):
        rows: list[list[Any]] = []
        for key, value in eval_results.items():
            if isinstance(value, Mapping):
                rows += [[f"{key} / {k}", v] for k, v in value.items()]
            else:
                rows.append([key, value])
        return _table(["metric", "value"], rows)
    results = list(eval_results)
    return _table(
        ["task", "dataset", "split", "metric", "value"],
        [
            [r.task_type, r.dataset_name, r.dataset_split or "", r.metric_name or r.metric_type, r.metric_value]
            for r in results
        ],
    )


def _history_summary(model: FlexLoRAModel) -> str:
    history = list(model.rank_history)
    if not history:
        return "No reallocation event was recorded: the picture shows the final rank map."
    records = [e for e in history if isinstance(e, Mapping)]
    steps = [e.get("step", "?") for e in records] or ["?"]
    pruned = sum(len(e.get("prune", [])) for e in records)
    added = sum(len(e.get("expand", [])) for e in records)
    events = "1 reallocation event" if len(history) == 1 else f"{len(history)} reallocation events"
    return (
        f"{events} between optimizer steps {steps[0]} and {steps[-1]} pruned {pruned} and added {added} "
        f"directions (see `{RANK_HISTORY_NAME}`)."
    )


def _versions() -> str:
    import peft
    import torch
    import transformers


    return "\n".join(
        [
            f"- flexlora_hf {__version__}",
            f"- PEFT {peft.__version__}",
            f"- Transformers {transformers.__version__}",
            f"- PyTorch {torch.__version__}",
        ]
    )


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


def build_model_card(
    model: FlexLoRAModel,
    *,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    eval_results: Mapping[str, Any] | Sequence[EvalResult] | None = None,
    training_args: Any = None,
    pipeline_tag: str | None = None,
    repo_id: str | None = None,
    language: str | Sequence[str] | None = None,
    license: str | None = None,
    tags: str | Sequence[str] | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Build the model card (`README.md`) of a FlexLoRA adapter.

    Args:
        model (`FlexLoRAModel`): the adapted model.
        base_model (`str`, *optional*): Hub id of the base model; defaults to the base config's `_name_or_path`
            when that looks like a Hub id. A local path is not put in the metadata; the card then says that the base
            model came from a local folder and how to name it (`push_to_hub(..., base_model=...)`).
        datasets (`str` or `list[str]`, *optional*): Hub ids of the training datasets.
        metrics (`str` or `list[str]`, *optional*): metric ids (e.g. `"accuracy"`).
        eval_results (`dict` or `list[EvalResult]`, *optional*): a `{metric: value}` mapping (shown as a table) or
            `huggingface_hub.EvalResult` objects (shown as a table and written to the `model-index` metadata).
        training_args (`TrainingArguments` or `dict`, *optional*): training hyper-parameters; of a
            `TrainingArguments` only the fields that define a run are shown.
        pipeline_tag (`str`, *optional*): Hub pipeline tag; inferred from the model class when not given
            (`text-generation`, `text-classification`, `token-classification`).
        repo_id (`str`, *optional*): the adapter's Hub id, used in the loading snippets.
        language (`str` or `list[str]`, *optional*): language metadata (as `Trainer.create_model_card`'s).
        license (`str`, *optional*): license metadata.
        tags (`str` or `list[str]`, *optional*): tags added after `flexlora`, `lora`, `peft` (and the base model's).
        model_name (`str`, *optional*): the name in the `model-index` metadata (default: `repo_id` or the title).

    Returns:
        `huggingface_hub.ModelCard`
    """
    base = model.get_base_model()
    local_base: str | None = None
    if base_model is None:
        name = base_model_name_or_path(base)
        if name and _REPO_ID_RE.match(name) and not os.path.exists(name):
            base_model = name
        elif name and is_local_path(name):
            local_base = name
    task_type = infer_task_type(base)
    pipeline_tag = pipeline_tag or _PIPELINE_TAGS.get(task_type or "")
    card_tags = ["flexlora", "lora", "peft"]
    if base_model:
        card_tags.append(f"base_model:adapter:{base_model}")  # the tag PEFT's own cards carry
    card_tags += [t for t in _as_list(tags) or [] if t not in card_tags]
    title = f"FlexLoRA adapter for {base_model}" if base_model else "FlexLoRA adapter"
    results = list(eval_results) if eval_results is not None and not isinstance(eval_results, Mapping) else None
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=card_tags,
        pipeline_tag=pipeline_tag,
        datasets=_as_list(datasets),
        metrics=_as_list(metrics),
        eval_results=results or None,
        model_name=(model_name or repo_id or title) if results else model_name,
        language=_as_list(language),
        license=license,
    )

    rank_table, other_rank_table = rank_tables(model.rank_map())
    flexlora_rows = [[k, v] for k, v in sorted(model.flexlora_config.to_dict().items())]
    load_kwargs = ""
    num_labels = getattr(getattr(base, "config", None), "num_labels", None)
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and num_labels is not None:
        load_kwargs = f", num_labels={num_labels}"
    card = ModelCard.from_template(
        card_data,
        template_str=load_template(),
        title=title,
        base_model=base_model,
        repo_id=repo_id,
        model_class=type(base).__name__,
        load_kwargs=load_kwargs,
        rank_table=rank_table,
        other_rank_table=other_rank_table,
        heatmap=HEATMAP_NAME,
        history_summary=_history_summary(model),
        budget_table=_budget_table(model),
        flexlora_table=_table(["parameter", "value"], flexlora_rows),
        training_table=_table(["parameter", "value"], _training_rows(training_args))
        if training_args is not None
        else "",
        eval_table=_eval_table(eval_results) if eval_results else "",
        versions=_versions(),
    )
    if local_base is not None:
        _add_local_base_note(card, local_base)
    return card


def _add_local_base_note(card: ModelCard, path: str) -> None:
    """Say, under the card's first paragraph, that the base model came from a local folder (a reader cannot load
    it from the path) and how the author names its Hub id."""
    note = (
        f"> **Base model:** loaded from a local folder (`{path}`), so this card cannot name it. "
        "Pass `base_model=\"<hub id of the base model>\"` when pushing (`push_to_hub(..., base_model=...)`) to "
        "fill the card's `base_model` and `base_model_name_or_path` in `adapter_config.json`.\n"
    )
    text = card.text
    anchor = text.find("\n\n", text.find("This is an **entropy-guided FlexLoRA** adapter"))
    card.text = text[: anchor + 2] + note + text[anchor + 1 :] if anchor >= 0 else note + "\n" + text
