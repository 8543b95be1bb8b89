"""lm-evaluation-harness integration: the `flexlora` model, `evaluate_adapter`, results tables and a CLI forwarder.

This module owns scoring FlexLoRA adapters with lm-eval:

* [`FlexLoRALM`], registered as lm-eval model `flexlora` when this module is imported (lm-eval has no plugin
  discovery: `import flexlora_hf.integrations.evaluation`, or run `python -m flexlora_hf.integrations.evaluation`).
  Model args:
  `pretrained=<base id or folder>`, `adapter=<FlexLoRA folder, exported PEFT folder or Hub id>` (optional: without
  it the plain base model is scored), `load_in_4bit=<bool>` (handled here through `flexlora_hf.load_base_model`,
  never passed to `from_pretrained`, which rejects it in transformers 5.x) and `dtype`. Every other HFLM argument
  works as usual.
* [`evaluate_adapter`]: `lm_eval.simple_evaluate` with the task configs shipped in `flexlora_hf/integrations/tasks`
  (`flexlora_commonsense`, `flexlora_llm_adapters[_<dataset>]`, `flexlora_bigbench_{social_iqa,strategyqa}`).
* [`results_table`] (from `tasks/results.py`): a per-task markdown table plus the average, in the column order of
  the paper's Table 2.
* `python -m flexlora_hf.integrations.evaluation <lm-eval flags>`: lm-eval's own CLI with `flexlora` registered and
  our tasks on the include path, for users who want every stock flag.

The BIG-bench eval data helper [`prepare_bigbench_eval_data`] is re-exported from `tasks.utils`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from .tasks import TASKS_DIR
from .tasks.results import DISPLAY_NAMES, results_table
from .tasks.utils import prepare_bigbench_eval_data

logger = logging.getLogger(__name__)

if __name__ == "__main__":  # `python -m flexlora_hf.integrations.evaluation`: run the imported module, so `flexlora` is
    from flexlora_hf.integrations.evaluation import lm_eval_cli as _cli  # registered once, by its real module name

    _cli()
    sys.exit(0)

def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "y"):
            return True
        if value.strip().lower() in ("0", "false", "no", "n", "none", ""):
            return False
        raise ValueError(f"Expected a boolean, got {value!r}.")
    return bool(value)


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16 or auto.")
    return resolved


def _load_adapter(base: nn.Module, adapter: str, **hub_kwargs: Any) -> nn.Module:
    """FlexLoRA folder / Hub repo -> FlexLoRAModel; a folder or repo with only a PEFT adapter -> PeftModel."""
    from ..adapter.model import FlexLoRAModel
    from ..config import CONFIG_NAME

    peft_only = os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, CONFIG_NAME))
    if not peft_only:
        try:
            return FlexLoRAModel.from_pretrained(base, adapter, **hub_kwargs)
        except FileNotFoundError:
            if os.path.isdir(adapter):
                raise
            logger.info("%s has no FlexLoRA files; trying it as a PEFT adapter.", adapter)
    from peft import PeftModel

    if os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter} holds neither a FlexLoRA adapter ({CONFIG_NAME}) nor a PEFT adapter.")
    return PeftModel.from_pretrained(base, adapter, **hub_kwargs)


def build_eval_model(
    pretrained: str,
    adapter: str | None = None,
    *,
    load_in_4bit: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load the base model (4-bit if asked), attach the adapter and return the transformers model, in eval mode.

    For a FlexLoRA adapter the returned object is the base transformers model with the adapter layers injected
    (what `FlexLoRAModel.get_base_model()` returns), so lm-eval sees an ordinary `PreTrainedModel`.

    Args:
        pretrained (`str`): base model id or folder.
        adapter (`str`, *optional*): FlexLoRA folder (native view), a folder or Hub repo with a stock PEFT adapter
            (e.g. the exported view only), or a Hub repo id.
        load_in_4bit (`bool`, *optional*, defaults to `False`): load the base in 4-bit NF4.
        dtype (`torch.dtype` or `str`, *optional*): weights / compute dtype; bf16 on CUDA, fp32 on CPU by default.
        device (`str`, *optional*): where to put the model (default: CUDA if available, else CPU).
        revision, token, trust_remote_code: passed to `from_pretrained`.
    """
    from ..adapter.quantization import load_base_model

    target = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if token is not None:
        kwargs["token"] = token
    if load_in_4bit and target.type == "cuda":
        kwargs["device_map"] = {"": target.index if target.index is not None else torch.cuda.current_device()}
    base = load_base_model(
        pretrained,
        load_in_4bit=load_in_4bit,
        compute_dtype=_resolve_dtype(dtype),
        gradient_checkpointing=False,
        **kwargs,
    )
    model: nn.Module = base
    if adapter:
        hub_kwargs = {"token": token} if token is not None else {}
        wrapped = _load_adapter(base, adapter, **hub_kwargs)
        from ..adapter.model import FlexLoRAModel

        model = wrapped.get_base_model() if isinstance(wrapped, FlexLoRAModel) else wrapped
    if not load_in_4bit:
        model.to(target)
    model.eval()
    if getattr(getattr(model, "config", None), "use_cache", None) is False:
        model.config.use_cache = True  # type: ignore[union-attr]  # generation speed; training turned it off
    return model


@register_model("flexlora")
class FlexLoRALM(HFLM):
    """lm-eval `HFLM` over a base model plus a FlexLoRA (or PEFT) adapter, optionally with a 4-bit base.

    Use as `--model flexlora --model_args pretrained=<base>,adapter=<dir>[,load_in_4bit=True]` or
    `simple_evaluate(model="flexlora", model_args={...})` after `import flexlora_hf.integrations.evaluation`.

    Args:
        pretrained (`str` or `PreTrainedModel`): base model id/folder (or a ready model, passed through to HFLM).
        adapter (`str`, *optional*): adapter folder or Hub id (see [`build_eval_model`]).
        load_in_4bit (`bool`, *optional*, defaults to `False`): 4-bit NF4 base via `load_base_model`.
        dtype (`str`, *optional*): model dtype (`auto` = bf16 on CUDA, fp32 on CPU).
        device (`str`, *optional*): device for the model.
        tokenizer (`str`, *optional*): tokenizer id/folder; defaults to `pretrained`.
        **kwargs: any other HFLM argument (`batch_size`, `max_length`, `add_bos_token`, ...).
    """

    def __init__(
        self,
        pretrained: Any,
        adapter: str | None = None,
        load_in_4bit: bool | str = False,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = None,
        tokenizer: Any = None,
        revision: str | None = "main",
        trust_remote_code: bool | str = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, (str, os.PathLike)):
            name = os.fspath(pretrained)
            model = build_eval_model(
                name,
                adapter=adapter or None,
                load_in_4bit=_to_bool(load_in_4bit),
                dtype=dtype,
                device=device,
                revision=None if revision in (None, "main") else revision,
                trust_remote_code=_to_bool(trust_remote_code),
            )
            tokenizer = tokenizer or name
            self.adapter_path = adapter
        else:
            if adapter:
                raise ValueError("FlexLoRALM: pass `adapter` together with a base model path, not a model object.")
            model = pretrained
            self.adapter_path = None
        super().__init__(
            pretrained=model,
            tokenizer=tokenizer,
            trust_remote_code=_to_bool(trust_remote_code),
            **kwargs,
        )


# -------------------------------------------------------------------------------------------------- evaluation
def _task_list(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = [t.strip() for t in items if t and t.strip()]
    if not out:
        raise ValueError("evaluate_adapter: no task given.")
    return out


def _include_paths(include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> list[str]:
    paths = [str(TASKS_DIR)]
    if include_path is None:
        return paths
    extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    return paths + [os.fspath(p) for p in extra]


def _resolvable(manager: Any, names: Sequence[Any], depth: int = 0) -> bool:
    """Whether every task (and every member of every group/tag) is in `manager`'s index."""
    index = manager.task_index
    for name in names:
        if isinstance(name, dict):  # inline task config inside a group
            if "include" in name or "task" not in name:
                return False
            name = name["task"]
        if not isinstance(name, str) or name not in index or depth > 8:
            return False
        entry = index[name]
        members = (entry.cfg or {}).get("task") if entry.kind.name == "GROUP" else None
        if entry.kind.name == "TAG":
            members = sorted(entry.tags)
        if isinstance(members, (list, str)) and not _resolvable(
            manager, [members] if isinstance(members, str) else members, depth + 1
        ):
            return False
    return True


def evaluate_adapter(
    base: str,
    adapter: str | None,
    tasks: str | Sequence[str],
    *,
    load_in_4bit: bool = False,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | None = "cpu",
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    num_fewshot: int | None = None,
    dtype: str = "auto",
    include_defaults: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    log_samples: bool = False,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Score `adapter` on top of `base` with lm-eval and return lm-eval's results dict.

    Args:
        base (`str`): base model id or folder.
        adapter (`str`, *optional*): FlexLoRA folder, exported PEFT folder or Hub id; `None` scores the base alone.
        tasks (`str` or `Sequence[str]`): lm-eval task/group names (comma-separated string or list), e.g.
            `"flexlora_bigbench_social_iqa"`, `"flexlora_llm_adapters"` or `"flexlora_commonsense"`.
        load_in_4bit (`bool`, *optional*, defaults to `False`): 4-bit NF4 base.
        limit (`int` or `float`, *optional*): rows per task (a fraction if < 1); for quick checks only.
        batch_size (`int` or `str`, *optional*, defaults to 1): lm-eval batch size (`"auto"` works on GPU).
        device (`str`, *optional*, defaults to `"cpu"`): model device.
        include_path (`str` or list, *optional*): extra task folders, searched after `flexlora_hf/integrations/tasks`.
        num_fewshot (`int`, *optional*): few-shot examples.
        dtype (`str`, *optional*, defaults to `"auto"`): model dtype.
        include_defaults (`bool`, *optional*): index lm-eval's built-in tasks; by default only when a requested task
            (or a member of a requested group) is not in the include paths (indexing them takes ~20 s).
        metadata (`dict`, *optional*): task metadata, e.g. `{"data_dir": ...}` for our local-data tasks.
        log_samples (`bool`, *optional*, defaults to `False`): keep per-sample outputs in the results.
        **simple_evaluate_kwargs: any other `lm_eval.simple_evaluate` argument.

    Returns:
        `dict`: lm-eval's results (`results`, `groups`, `n-samples`, `config`, ...).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_names = _task_list(tasks)
    paths = _include_paths(include_path)
    meta = dict(metadata) if metadata else None
    manager = None
    if include_defaults is None:  # index lm-eval's own ~10k configs (~20 s) only when a task needs them
        local = TaskManager(include_path=paths, include_defaults=False, metadata=meta)
        include_defaults = not _resolvable(local, task_names)
        manager = None if include_defaults else local
    if manager is None:
        manager = TaskManager(include_path=paths, include_defaults=include_defaults, metadata=meta)
    model_args: dict[str, Any] = {"pretrained": base, "load_in_4bit": load_in_4bit, "dtype": dtype}
    if adapter:
        model_args["adapter"] = adapter
    results = simple_evaluate(
        model="flexlora",
        model_args=model_args,
        tasks=task_names,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        **simple_evaluate_kwargs,
    )
    if results is None:  # non-zero ranks of a distributed run
        return {}
    return dict(results)


# -------------------------------------------------------------------------------------------------- tables
def lm_eval_cli(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's own CLI with `flexlora` registered and `flexlora_hf/integrations/tasks` on the include path.

    `python -m flexlora_hf.integrations.evaluation --model flexlora --model_args pretrained=B,adapter=A --tasks T` is
    `lm-eval run ...` with every stock flag. If `--include_path` is not given, our task folder is used.
    """
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        if args and args[0] in ("run", "ls", "validate"):
            args = [args[0], "--include_path", str(TASKS_DIR), *args[1:]]
        elif args:
            args = ["run", "--include_path", str(TASKS_DIR), *args]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


__all__ = [
    "DISPLAY_NAMES",
    "FlexLoRALM",
    "build_eval_model",
    "evaluate_adapter",
    "lm_eval_cli",
    "prepare_bigbench_eval_data",
    "results_table",
]
