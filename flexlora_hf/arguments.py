"""`FlexLoRAArguments`: the command-line face of `FlexLoRAConfig` for `HfArgumentParser` scripts.

This module owns turning command-line / JSON strings into a [`FlexLoRAConfig`]. `FlexLoRAArguments` is generated
from `FlexLoRAConfig`'s own fields (same names, defaults and help strings, so a field added to the config is a flag
at once), with three adaptations that let it sit next to `TrainingArguments` in one parser:

* ``seed`` is renamed ``flexlora_seed`` (``--seed`` belongs to `TrainingArguments`); it defaults to the training
  seed when left unset;
* ``target_modules`` and ``modules_to_save`` are strings: comma-separated names (``query,key,value``),
  ``all-linear``, or ``re:<regex>`` for a regex matched against the full module path;
* ``max_rank`` is a string: an integer, or a JSON object mapping module paths to caps.

Example:

```python
>>> from transformers import HfArgumentParser, TrainingArguments
>>> from flexlora_hf.arguments import FlexLoRAArguments
>>> parser = HfArgumentParser((TrainingArguments, FlexLoRAArguments))
>>> training_args, flexlora_args = parser.parse_args_into_dataclasses(
...     ["--output_dir", "out", "--r", "8", "--target_modules", "query,value"])
>>> config = flexlora_args.to_flexlora_config(seed=training_args.seed)
```
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from .config import FlexLoRAConfig

REGEX_PREFIX = "re:"
"""Prefix marking a ``--target_modules`` value as a regular expression instead of a list of names."""

RENAMED_FIELDS: dict[str, str] = {"seed": "flexlora_seed"}
"""`FlexLoRAConfig` field -> flag name, where the config's name clashes with `TrainingArguments`."""

_STRING_FIELDS: dict[str, str] = {
    "target_modules": "Comma-separated module names (suffix match, e.g. 'query,key,value'), 'all-linear', or "
    "'re:<regex>' (full match on the module path). Unset: every linear layer except the output head.",
    "modules_to_save": "Comma-separated modules trained in full and saved with the adapter (e.g. 'classifier,pooler'). "
    "Unset: the classification head of *ForSequenceClassification models; 'none' for nothing.",
    "max_rank": "Per-module rank cap: an integer, or a JSON object {module path: cap}. Unset: derived exactly "
    "(r + number of scheduled events).",
}


def parse_module_list(value: Any) -> list[str] | str | None:
    """Parse a ``--target_modules`` / ``--modules_to_save`` value.

    Args:
        value (`str`, `list[str]` or `None`):
            ``"query,key,value"`` -> ``["query", "key", "value"]``; ``"all-linear"`` stays as is; ``"re:.*attn.*"``
            -> the regex ``".*attn.*"``; ``"none"`` -> ``[]``; a list (from a JSON config) is kept; `None` or an
            empty string -> `None` (the library default).

    Returns:
        `list[str]`, `str` or `None`: a value `FlexLoRAConfig` accepts.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple, set)):
        return [str(v) for v in value]
    text = str(value).strip()
    if not text:
        return None
    if text.lower() == "none":
        return []
    if text == "all-linear":
        return text
    if text.startswith(REGEX_PREFIX):
        return text[len(REGEX_PREFIX) :]
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_max_rank(value: Any) -> int | dict[str, int] | None:
    """Parse a ``--max_rank`` value: ``"12"`` -> 12, ``'{"layer.0.query": 16}'`` -> a dict, `None`/``""`` -> `None`.

    Args:
        value (`str`, `int`, `dict` or `None`): the flag value (a JSON config may give an int or a dict directly).

    Returns:
        `int`, `dict[str, int]` or `None`.

    Raises:
        ValueError: if the string is neither an integer nor a JSON object.
    """
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): int(v) for k, v in value.items()}
    text = str(value).strip()
    if not text:
        return None
    if text.startswith("{"):
        return parse_max_rank(json.loads(text))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--max_rank={value!r} must be an integer or a JSON object {{module path: cap}}.") from None


def _build_arguments_class() -> type:
    hints = typing.get_type_hints(FlexLoRAConfig)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(FlexLoRAConfig):
        help_text = f.metadata.get("help", "")
        if f.name in _STRING_FIELDS:
            specs.append(
                (f.name, str | None, dataclasses.field(default=None, metadata={"help": _STRING_FIELDS[f.name]}))
            )
        elif f.name in RENAMED_FIELDS:
            specs.append(
                (
                    RENAMED_FIELDS[f.name],
                    int | None,
                    dataclasses.field(
                        default=None, metadata={"help": f"{help_text} Defaults to TrainingArguments' --seed."}
                    ),
                )
            )
        else:
            default: Any = f.default if f.default is not dataclasses.MISSING else None
            specs.append((f.name, hints[f.name], dataclasses.field(default=default, metadata={"help": help_text})))

    def to_flexlora_config(self: Any, seed: int | None = None) -> FlexLoRAConfig:
        """Build the validated [`FlexLoRAConfig`].

        Args:
            seed (`int`, *optional*): used for ``FlexLoRAConfig.seed`` when ``--flexlora_seed`` is unset
                (pass ``training_args.seed``).

        Returns:
            `FlexLoRAConfig`.

        Raises:
            ValueError: from `FlexLoRAConfig` validation, naming the field and the fix.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(FlexLoRAConfig):
            values[f.name] = getattr(self, RENAMED_FIELDS.get(f.name, f.name))
        values["target_modules"] = parse_module_list(values["target_modules"])
        values["modules_to_save"] = parse_module_list(values["modules_to_save"])
        values["max_rank"] = parse_max_rank(values["max_rank"])
        if values["seed"] is None:
            values["seed"] = seed if seed is not None else FlexLoRAConfig.seed
        return FlexLoRAConfig(**values)

    cls = dataclasses.make_dataclass(
        "FlexLoRAArguments",
        specs,
        namespace={"to_flexlora_config": to_flexlora_config, "__module__": __name__},
    )
    cls.__doc__ = (
        "Command-line arguments for a `FlexLoRAConfig` (one flag per config field; see the module docstring for "
        "the string syntax of `target_modules`, `modules_to_save` and `max_rank`, and `flexlora_seed`). Call "
        "`to_flexlora_config(seed=training_args.seed)` to get the validated config."
    )
    return cls


FlexLoRAArguments: Any = _build_arguments_class()
