"""`FlexLoRAArguments`: the command-line face of `FlexLoRAConfig` for `HfArgumentParser` scripts.

This module owns turning command-line / JSON strings into a [`FlexLoRAConfig`]. `FlexLoRAArguments` is generated
from `FlexLoRAConfig`'s own fields (same names and help strings, so a field added to the config is a flag at once).
`--help` shows the flags a LoRA user sets ([`HELP_FIELDS`]: rank, targets, the schedule, γ) and `--flexlora_config`,
a JSON file of any `FlexLoRAConfig` fields (a saved `flexlora_config.json`, or an adapter folder holding one); the
other fields (the paper's ablation switches and our deviations) are still flags of their own name, left out of
`--help`. A flag given on the command line wins over the file, the file over the config's defaults. Three more
adaptations let it sit next to `TrainingArguments` in one parser:

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

import argparse
import dataclasses
import json
import os
import typing
from typing import Any

from ..config import CONFIG_NAME, REGEX_PREFIX, FlexLoRAConfig, parse_max_rank, parse_module_list

__all__ = ["REGEX_PREFIX", "FlexLoRAArguments", "parse_max_rank", "parse_module_list"]

RENAMED_FIELDS: dict[str, str] = {"seed": "flexlora_seed"}
"""`FlexLoRAConfig` field -> flag name, where the config's name clashes with `TrainingArguments`."""

HELP_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "b0", "t_warmup", "t_final", "delta_t",
    "orth_reg_weight",
)
"""The fields `--help` lists; every other `FlexLoRAConfig` field is a hidden flag or comes from `--flexlora_config`."""

CONFIG_FILE_HELP = (
    "A JSON file of FlexLoRAConfig fields, or an adapter folder holding flexlora_config.json: the settings --help does "
    "not list (importance, allocation, expansion_init, svd_prune, grace_events, schedule, init_basis, max_rank, ...). "
    "Each of those is also accepted as a flag of its own name; flags win over the file."
)

_STRING_FIELDS: dict[str, str] = {
    "target_modules": "Comma-separated module names (suffix match, e.g. 'query,key,value'), 'all-linear', or "
    "'re:<regex>' (full match on the module path). Unset: every linear layer except the output head.",
    "modules_to_save": "Comma-separated modules trained in full and saved with the adapter (e.g. 'classifier,pooler'). "
    "Unset: the classification head of *ForSequenceClassification models; 'none' for nothing.",
    "max_rank": "Per-module rank cap: an integer, or a JSON object {module path: cap}. Unset: derived exactly "
    "(r + number of scheduled events).",
}


def _help(name: str, text: str, default: Any) -> str:
    if name not in HELP_FIELDS:
        return argparse.SUPPRESS  # a hidden flag: set through --flexlora_config (or this flag)
    # The flag's own default is None ("not given", so --flexlora_config can fill it); show the config's default
    # instead. HfArgumentParser's formatter appends "(default: %(default)s)" unless the help names %(default):
    # "%(default).0s" names it and prints nothing.
    shown = "" if default is None or "Unset:" in text else f" (default: {default})"
    return f"{text}{shown}%(default).0s"


def _build_arguments_class() -> type:
    hints = typing.get_type_hints(FlexLoRAConfig)
    specs: list[tuple[str, Any, Any]] = [
        ("flexlora_config", str | None, dataclasses.field(default=None, metadata={"help": CONFIG_FILE_HELP}))
    ]
    for f in dataclasses.fields(FlexLoRAConfig):
        name = RENAMED_FIELDS.get(f.name, f.name)
        default: Any = f.default if f.default is not dataclasses.MISSING else None
        if f.name in _STRING_FIELDS:
            kind: Any = str | None
            text = _STRING_FIELDS[f.name]
        elif f.name in RENAMED_FIELDS:
            kind = int | None
            text = f"{f.metadata.get('help', '')} Defaults to TrainingArguments' --seed."
        else:
            # None marks "not given", so a value from --flexlora_config is not overwritten by a default
            kind = hints[f.name] if type(None) in typing.get_args(hints[f.name]) else hints[f.name] | None
            text = f.metadata.get("help", "")
        specs.append((name, kind, dataclasses.field(default=None, metadata={"help": _help(f.name, text, default)})))

    def to_flexlora_config(self: Any, seed: int | None = None) -> FlexLoRAConfig:
        """Build the validated [`FlexLoRAConfig`]: the config's defaults, then `--flexlora_config`, then the flags.

        Args:
            seed (`int`, *optional*): used for ``FlexLoRAConfig.seed`` when neither ``--flexlora_seed`` nor the
                file sets it (pass ``training_args.seed``).

        Returns:
            `FlexLoRAConfig`.

        Raises:
            ValueError: from `FlexLoRAConfig` validation, naming the field and the fix, or for an unreadable file.
        """
        values: dict[str, Any] = read_config_file(self.flexlora_config) if self.flexlora_config else {}
        for f in dataclasses.fields(FlexLoRAConfig):
            given = getattr(self, RENAMED_FIELDS.get(f.name, f.name))
            if given is not None:
                values[f.name] = given
        for name in ("target_modules", "modules_to_save"):
            if isinstance(values.get(name), str):
                values[name] = parse_module_list(values[name])
        if isinstance(values.get("max_rank"), str):
            values["max_rank"] = parse_max_rank(values["max_rank"])
        if values.get("seed") is None:
            values["seed"] = seed if seed is not None else FlexLoRAConfig.seed
        return FlexLoRAConfig.from_dict(values)

    cls = dataclasses.make_dataclass(
        "FlexLoRAArguments",
        specs,
        namespace={"to_flexlora_config": to_flexlora_config, "__module__": __name__},
    )
    cls.__doc__ = (
        "Command-line arguments for a `FlexLoRAConfig`: one flag per config field (the common ones in --help), plus "
        "`--flexlora_config FILE` for the rest; see the module docstring for the string syntax of `target_modules`, "
        "`modules_to_save` and `max_rank`, and `flexlora_seed`. Call `to_flexlora_config(seed=training_args.seed)` "
        "to get the validated config."
    )
    return cls


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields in a `--flexlora_config` file: a JSON object, or an adapter folder's `flexlora_config.json`
    (its bookkeeping keys, those starting with ``_``, are skipped). Unknown keys are refused by `from_dict` later."""
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else os.fspath(path)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        message = f"--flexlora_config {path}: cannot read a JSON object of FlexLoRAConfig fields ({err})."
        raise ValueError(message) from err
    if not isinstance(data, dict):
        raise ValueError(f"--flexlora_config {path}: must hold a JSON object of FlexLoRAConfig fields.")
    return {k: v for k, v in data.items() if not k.startswith("_")}


FlexLoRAArguments: Any = _build_arguments_class()
