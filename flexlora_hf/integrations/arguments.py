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
>>> from flexlora_hf.integrations.arguments import FlexLoRAArguments
>>> parser = HfArgumentParser((TrainingArguments, FlexLoRAArguments))
>>> training_args, flexlora_args = parser.parse_args_into_dataclasses(
...     ["--output_dir", "out", "--r", "8", "--target_modules", "query,value"])
>>> config = flexlora_args.to_flexlora_config(seed=training_args.seed)
```
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..config import REGEX_PREFIX, FlexLoRAConfig, parse_max_rank, parse_module_list

__all__ = ["REGEX_PREFIX", "FlexLoRAArguments", "parse_max_rank", "parse_module_list"]

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
