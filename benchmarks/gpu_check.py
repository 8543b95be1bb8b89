"""The GPU check: one command that measures and exercises what only a GPU machine can show (run via gpu_check.sh).

Parts (each writes its JSON into OUT_DIR; `summary.md` collects the tables):

1. **cost**: bf16 training step and peak memory of FlexLoRA vs PEFT LoRA vs PEFT AdaLoRA (its own recipe: init_r 12,
   target_r 8) on a SmolLM2-135M-shaped model with random weights (no download), steady state (no FlexLoRA event in
   the timed window: a real schedule has one per 100-1000 steps; see part 2 for its cost).
2. **event**: one reallocation event at LLaMA3-8B adapter shapes (160 matrices, r 8) on the device.
3. **split**: a model placed across devices (half the decoder layers on cuda:0, half on the CPU, as
   ``device_map`` produces, via accelerate's ``dispatch_model``): a training step with eq. 2, an event, save, load.
4. **4bit**: a 4-bit NF4 base (bitsandbytes, when importable; skipped with a clear line otherwise): train steps
   through an event, save, reload and compare logits.

``--device cpu`` runs every part on the CPU with small sizes: the smoke test that keeps this script working in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from .common import machine_info, offline_env, setup_logging, tiny_llama_config

logger = logging.getLogger("benchmarks.gpu_check")


def part_cost(out: str, device: str, smoke: bool) -> dict[str, Any]:
    from . import cost

    argv = ["--model", "tiny" if smoke else "smollm2-random", "--device", device, "--flexlora-every", "0"]
    argv += ["--adalora-init-r", "12", "--adalora-target-r", "8", "--output", os.path.join(out, "cost.json")]
    argv += ["--repeats", "2", "--steps", "2", "--memory", "off"] if smoke else ["--dtype", "bf16", "--repeats", "5"]
    return cost.run(argv)


def part_event(out: str, device: str, smoke: bool) -> dict[str, Any]:
    from . import event_cost

    argv = ["--ranks", "8", "--device", device, "--output", os.path.join(out, "event_cost.json")]
    argv += ["--repeats", "2", "--warmup", "1", "--orth-repeats", "1"] if smoke else []
    return event_cost.run(argv)


def _split_llama(first: str, second: str) -> Any:
    from accelerate import dispatch_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = 4
    model = LlamaForCausalLM(cfg)
    half = cfg.num_hidden_layers // 2
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first}
    device_map.update({f"model.layers.{i}": first if i < half else second for i in range(cfg.num_hidden_layers)})
    device_map.update({"model.norm": second, "lm_head": second})
    return dispatch_model(model, device_map=device_map)


def part_split(out: str, device: str, smoke: bool) -> dict[str, Any]:
    from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, get_flexlora_model

    first = device if device != "cpu" else "cpu"
    fm = get_flexlora_model(_split_llama(first, "cpu"), FlexLoRAConfig(r=4, b0=2, t_warmup=1, t_final=1, delta_t=1,
                                                                       total_steps=6, schedule="constant"))
    devices = sorted({str(layer.lora_lam.device) for _, layer in fm.flexlora_layers()})
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0)).to(first)
    losses, events = [], 0
    for step in range(1, 6):
        loss = fm(input_ids=x, labels=x).loss + 0.1 * fm.orth_reg()  # eq. 2 over layers on several devices
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        events += fm.update_and_allocate(step, opt) is not None
        losses.append(float(loss))
    with tempfile.TemporaryDirectory() as folder:
        fm.save_pretrained(folder)
        loaded = FlexLoRAModel.from_pretrained(_split_llama(first, "cpu"), folder)
        with torch.no_grad():
            diff = float((loaded(input_ids=x).logits - fm.eval()(input_ids=x).logits).abs().max())
    result = {"devices": devices, "losses": losses, "events": events, "reload_max_abs_diff": diff,
              "ok": events > 0 and diff < 1e-4 and all(map(lambda v: v == v, losses))}
    _write(out, "split.json", result)
    return result


def part_4bit(out: str, device: str, smoke: bool) -> dict[str, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        result = {"skipped": "bitsandbytes is not installed: the 4-bit check did not run (pass a wheel to install)."}
        logger.warning(result["skipped"])
        _write(out, "4bit.json", result)
        return result
    from transformers import LlamaForCausalLM

    from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, get_flexlora_model, load_base_model

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(os.path.join(folder, "base"))
        kwargs = {"device_map": {"": device}} if device != "cpu" else {}
        base = load_base_model(os.path.join(folder, "base"), load_in_4bit=True, **kwargs)
        fm = get_flexlora_model(base, FlexLoRAConfig(r=4, b0=2, t_warmup=1, t_final=1, delta_t=1, total_steps=6,
                                                     schedule="constant"))
        opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=1e-2)
        x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
        events, t0 = 0, time.perf_counter()
        for step in range(1, 6):
            (fm(input_ids=x, labels=x).loss + 0.1 * fm.orth_reg()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            events += fm.update_and_allocate(step, opt) is not None
        fm.save_pretrained(os.path.join(folder, "adapter"))
        again = load_base_model(os.path.join(folder, "base"), load_in_4bit=True, **kwargs)
        loaded = FlexLoRAModel.from_pretrained(again, os.path.join(folder, "adapter"))
        with torch.no_grad():
            diff = float((loaded(input_ids=x).logits - fm.eval()(input_ids=x).logits).abs().max())
    result = {"events": events, "seconds": time.perf_counter() - t0, "reload_max_abs_diff": diff,
              "ok": events > 0 and diff < 1e-3}
    _write(out, "4bit.json", result)
    return result


PARTS = {"cost": part_cost, "event": part_event, "split": part_split, "4bit": part_4bit}


def _write(out: str, name: str, data: dict[str, Any]) -> None:
    with open(os.path.join(out, name), "w") as f:
        json.dump(data, f, indent=2, default=str)


def summary(results: dict[str, Any], machine: dict[str, Any]) -> str:
    from . import cost, event_cost

    lines = [f"# FlexLoRA GPU check: {machine.get('device_name') or machine.get('device')}", ""]
    for name, res in results.items():
        lines += [f"## {name}", ""]
        if isinstance(res, dict) and "error" in res:
            lines += ["FAILED:", "", "```", res["error"][-2000:], "```", ""]
        elif name == "cost":
            lines += [cost.format_table(res), ""]
        elif name == "event":
            lines += [event_cost.format_table(res), ""]
        else:
            lines += ["```json", json.dumps(res, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the smoke test, small sizes).")
    p.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS))
    args = p.parse_args(argv)
    setup_logging()
    offline_env()
    os.makedirs(args.out_dir, exist_ok=True)
    smoke = args.device == "cpu"
    machine = machine_info(torch.device(args.device))
    results: dict[str, Any] = {}
    for name in args.parts:
        t0 = time.perf_counter()
        try:
            results[name] = PARTS[name](args.out_dir, args.device, smoke)
        except Exception:  # keep going: one failing part must not hide the others' figures
            results[name] = {"error": traceback.format_exc()}
            logger.error("part %s failed:\n%s", name, results[name]["error"])
        logger.info("part %s done in %.0f s", name, time.perf_counter() - t0)
    _write(args.out_dir, "gpu_check.json", {"machine": machine, "results": results})
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write(summary(results, machine))
    failed = [n for n, r in results.items() if isinstance(r, dict) and ("error" in r or r.get("ok") is False)]
    if failed:
        logger.error("failed parts: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
