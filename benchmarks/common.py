"""Shared pieces of the benchmarks: devices, models, the three adapter methods, a timed training step, statistics.

Everything here is device-agnostic: pass ``device="cuda"`` (or let `pick_device` choose) and the same code times
GPU kernels (with ``torch.cuda.synchronize`` around each timed region) and reads ``torch.cuda.max_memory_allocated``;
on the CPU it reads the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``).

The three methods are built with the same rank ``r``, ``lora_alpha``, dropout and target modules:

* ``lora``: PEFT `LoraConfig(r=r)`.
* ``flexlora``: `FlexLoRAConfig(r=r)` with ``max_rank = r + capacity_extra`` slots per matrix (the slots the
  forward pass really computes over; 21 extra is what the paper's LLaMA3-8B schedule needs, see
  ``docs/benchmarks.md``), orthogonality term γ·R added to the loss as `FlexLoRATrainer` does, and reallocation
  events from `flexlora_hf.adapter.events.run_event` on the schedule's event steps (after ``optimizer.step()``).
* ``adalora``: PEFT `AdaLoraConfig(init_r=..., target_r=...)`; PEFT adds its orthogonality term inside the forward
  pass, and ``update_and_allocate(step)`` is called after every ``optimizer.step()`` (before ``zero_grad``) as PEFT
  requires.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

METHODS = ("lora", "flexlora", "adalora")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the paper's LLaMA3-8B setting (Table 9)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------- setup
def setup_logging(level: int = logging.INFO) -> None:
    """Plain `logging` setup for the command-line entry points (quiet third-party loggers)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "peft", "datasets", "bitsandbytes", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)


def offline_env() -> None:
    """Never contact the Hugging Face Hub from a benchmark."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("transformers", "peft"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return None


def command_line(argv: Sequence[str] | None = None) -> str:
    """`argv` (default ``sys.argv``) as one shell line; a module of this repository run with ``-m`` reads as
    ``python -m benchmarks.<name> ...``."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        head = Path(argv[0]).resolve()
        if head.is_relative_to(ROOT) and (head.parent / "__init__.py").is_file():
            argv = ["python", "-m", ".".join(head.relative_to(ROOT).with_suffix("").parts), *argv[1:]]
    return shlex.join(argv)


def provenance() -> dict[str, Any]:
    """What made a record: ``flexlora_hf_version``, ``git_commit`` (``git rev-parse HEAD``, ``+dirty`` when a
    tracked file differs from it; None outside a git checkout), ``machine`` (platform, CPU count, torch version, the
    GPU if any) and ``command`` (this process's command line). Every new record of a study carries it."""
    import flexlora_hf

    commit = _git("rev-parse", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    machine = f"{platform.platform()}; {os.cpu_count()} CPUs; torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f"; {torch.cuda.get_device_name()}"
    return {
        "flexlora_hf_version": flexlora_hf.__version__,
        "git_commit": commit or None,
        "machine": machine,
        "command": command_line(),
    }


# ---------------------------------------------------------------------------------------------------------- stats
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), no numpy needed."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, inter-quartile range (q25, q75) and n of a list of repeats."""
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals) if vals else float("nan"),
        "q25": quantile(vals, 0.25),
        "q75": quantile(vals, 0.75),
        "n": len(vals),
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals) if vals else float("nan"),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "values": vals,
    }


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    logger.info("Wrote %s", path)


# ---------------------------------------------------------------------------------------------------------- memory
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory of a code region, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory only). CPU: the
    process's peak RSS (``VmHWM``), reset at `start` by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0);
    where that is impossible, ``ru_maxrss``, whose high-water mark can only be trusted in a fresh process (that is why
    `benchmarks.cost` measures memory in one subprocess per method). ``peak`` is the absolute peak, ``delta`` the
    peak minus the memory in use at `start`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self.base = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "cuda_max_memory_allocated"
            return
        reset = False
        with contextlib.suppress(OSError), open(_CLEAR_REFS, "w") as f:
            f.write("5")
            reset = True
        rss = _status_kib("VmRSS")
        if reset and rss is not None:
            self.kind = "rss_hwm_reset"
            self.base = rss / 1024
        else:
            import resource

            self.kind = "ru_maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "rss_hwm_reset":
            peak = (_status_kib("VmHWM") or 0) / 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"kind": self.kind, "peak_mib": peak, "start_mib": self.base, "delta_mib": peak - self.base}


# ---------------------------------------------------------------------------------------------------------- models
def tiny_llama_config() -> Any:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads, vocab 512) for quick runs and tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def smollm2_shaped_config() -> Any:
    """SmolLM2-135M's architecture (30 layers, hidden 576, GQA 9/3, vocab 49152), for random weights: no download."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def load_causal_lm(name: str, *, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """``tiny`` (random Llama from `tiny_llama_config`), ``smollm2`` (SmolLM2-135M from `flexlora_hf.data.assets`)
    or ``smollm2-random`` (the same architecture with random weights)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "tiny":
        model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    elif name == "smollm2":
        from flexlora_hf.data.assets import materialize_smollm2

        model = AutoModelForCausalLM.from_pretrained(materialize_smollm2(), dtype=dtype)
    elif name == "smollm2-random":
        model = LlamaForCausalLM(smollm2_shaped_config()).to(dtype)
    else:
        raise ValueError(f"Unknown model {name!r}; choose tiny, smollm2 or smollm2-random.")
    model.config.use_cache = False
    return model.to(device)


def random_batch(vocab_size: int, batch_size: int, seq_len: int, *, device: torch.device, seed: int = 0) -> dict:
    """A fixed causal-LM batch of random token ids (labels = inputs): identical for every method."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.clone().to(device),
    }


# ---------------------------------------------------------------------------------------------------------- adapters
@dataclass
class AdapterSpec:
    """Everything that defines the three adapters and their schedules for one benchmark.

    ``first_event_after`` untimed warm-up steps come first; after them FlexLoRA reallocates every
    ``flexlora_every`` steps (1: every step, the worst case; 0: never, the steady-state step a real schedule with
    Δ_T = 100-1000 pays between events) and AdaLoRA masks every step (``deltaT = 1``: its own recipe calls
    ``update_and_allocate`` after every step).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    capacity_extra: int = 21
    b0: int = 4
    orth_reg_weight: float = 0.1
    first_event_after: int = 1
    total_steps: int = 10
    flexlora_every: int = 1  # FlexLoRA event every this many steps after the warm-up (0: none in the timed window)
    adalora_init_r: int | None = None  # default r
    adalora_target_r: int | None = None  # default r - 1 (PEFT cannot run target_r == init_r, see docs)
    task_type: str = "CAUSAL_LM"

    @property
    def init_r(self) -> int:
        return self.adalora_init_r if self.adalora_init_r is not None else self.r

    @property
    def target_r(self) -> int:
        return self.adalora_target_r if self.adalora_target_r is not None else max(1, self.init_r - 1)


def flexlora_config(spec: AdapterSpec) -> Any:
    from flexlora_hf import FlexLoRAConfig

    return FlexLoRAConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        b0=spec.b0,
        t_warmup=spec.first_event_after,
        t_final=0,
        delta_t=spec.flexlora_every or spec.total_steps + 1,
        total_steps=spec.total_steps,
        schedule="constant",
        orth_reg_weight=spec.orth_reg_weight,
        max_rank=spec.r + spec.capacity_extra,
    )


def wrap_model(method: str, model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Inject `method`'s adapter into `model` (in place for PEFT, wrapped for FlexLoRA) and return the model to train."""
    if method == "flexlora":
        from flexlora_hf import get_flexlora_model

        return get_flexlora_model(model, flexlora_config(spec))
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if method == "lora":
        cfg: Any = LoraConfig(
            r=spec.r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=list(spec.target_modules),
            task_type=spec.task_type,
        )
    elif method == "adalora":
        cfg = AdaLoraConfig(
            init_r=spec.init_r,
            target_r=spec.target_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=list(spec.target_modules),
            tinit=spec.first_event_after,
            tfinal=1,
            deltaT=1,
            total_step=spec.total_steps + 1,
            orth_reg_weight=spec.orth_reg_weight,
            task_type=spec.task_type,
        )
    else:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return get_peft_model(model, cfg)


def adapter_parameter_counts(method: str, model: nn.Module) -> dict[str, int]:
    """Allocated trainable parameters, and the active ones (FlexLoRA: active slots only)."""
    allocated = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "flexlora":
        active, allocated, _ = model.trainable_parameter_counts()  # type: ignore[operator]
        return {"allocated": int(allocated), "active": int(active)}
    return {"allocated": int(allocated), "active": int(allocated)}


class Trainee:
    """One model + AdamW + its method's per-step bookkeeping; `step` runs one timed optimizer step."""

    def __init__(self, method: str, model: nn.Module, *, lr: float = 3e-4, device: torch.device) -> None:
        self.method = method
        self.model = model
        self.device = device
        self.t = 0  # completed optimizer steps (1-based after the first step)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward, loss (+ orthogonality term), backward, AdamW step, the method's allocation work, zero_grad."""
        dev = self.device
        synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.model(**batch)
        loss = out.loss
        if self.method == "flexlora":
            fm: Any = self.model
            loss = loss + fm.flexlora_config.orth_reg_weight * fm.orth_reg()  # what FlexLoRATrainer.compute_loss adds
        loss.backward()
        self.optimizer.step()
        self.t += 1
        alloc_s = alloc_cpu_s = 0.0
        if self.method == "adalora":
            synchronize(dev)
            a0, ac0 = time.perf_counter(), time.process_time()
            self.model.base_model.update_and_allocate(self.t)  # type: ignore[union-attr,operator]
            synchronize(dev)
            alloc_s, alloc_cpu_s = time.perf_counter() - a0, time.process_time() - ac0
        self.optimizer.zero_grad(set_to_none=True)
        if self.method == "flexlora":
            alloc_s, alloc_cpu_s = self._flexlora_event()
        synchronize(dev)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "step_s": total,
            "cpu_s": cpu,
            "alloc_s": alloc_s,
            "alloc_cpu_s": alloc_cpu_s,
            "loss": float(out.loss.detach()),
        }

    def _flexlora_event(self) -> tuple[float, float]:
        from flexlora_hf.functional.schedule import is_event_step

        fm: Any = self.model
        cfg = fm.flexlora_config
        if not is_event_step(self.t, **cfg.grid_kwargs()):
            return 0.0, 0.0
        synchronize(self.device)
        a0, ac0 = time.perf_counter(), time.process_time()
        fm.update_and_allocate(self.t, self.optimizer)
        synchronize(self.device)
        return time.perf_counter() - a0, time.process_time() - ac0


def build_trainee(
    method: str, base: nn.Module, spec: AdapterSpec, *, device: torch.device, copy_base: bool = True, lr: float = 3e-4
) -> Trainee:
    model = copy.deepcopy(base) if copy_base else base
    model = wrap_model(method, model, spec).to(device)
    return Trainee(method, model, lr=lr, device=device)


def rotated(items: Sequence[str], k: int) -> list[str]:
    """Round-robin order for repeat k (each method goes first equally often)."""
    k %= max(len(items), 1)
    return list(items[k:]) + list(items[:k])


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
