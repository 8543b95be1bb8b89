"""How large each method's trained update is, per module type: ||ΔW||_F of PEFT-format LoRA adapter folders.

    python -m benchmarks.delta_norms outputs/decoder_intent_200/lora-s0/adapter outputs/decoder_intent_200/flexlora-s0/adapter \
        --output benchmarks/results/delta_norms_intent.json

Reads any PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``; FlexLoRA's export writes one
beside its native files, with a per-module ``rank_pattern`` / ``alpha_pattern``) and reports, per folder, the mean
Frobenius norm of ΔW = scaling · B A over the modules of each type (the module path's last part: ``q_proj``,
``up_proj``, ...). It is the diagnostic behind the λ learning-rate study (docs/benchmarks.md; the per-matrix λ rate it
motivated was measured and folded, λ trains at the optimizer's rate): PEFT LoRA's updates grow with a matrix's output
width (B has d_out x r entries, each moved by Adam at about lr per step), FlexLoRA's λ-driven ones with λ's rate alone.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from flexlora_hf.constants import PEFT_CONFIG_NAME, PEFT_KEY_PREFIX, PEFT_WEIGHTS_NAME


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule for rank_pattern / alpha_pattern keys: a key matches a module path ending in it (regex allowed).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def delta_norms(folder: str | Path) -> dict[str, dict[str, float]]:
    """{module type: {"mean": mean ||ΔW||_F, "n": modules}} of one PEFT LoRA folder."""
    folder = Path(folder)
    cfg = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    weights = load_file(str(folder / PEFT_WEIGHTS_NAME))
    per_type: dict[str, list[float]] = {}
    for key, A in weights.items():  # A (r, in)
        if ".lora_A." not in key:
            continue
        B = weights[key.replace(".lora_A.", ".lora_B.")].float()  # (out, r)
        module = key.split(".lora_A.")[0].removeprefix(PEFT_KEY_PREFIX)
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        per_type.setdefault(module.rsplit(".", 1)[-1], []).append(float((scaling * (B @ A.float())).norm()))
    return {t: {"mean": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_type.items())}


def format_table(result: dict[str, dict[str, dict[str, float]]]) -> str:
    types = sorted({t for norms in result.values() for t in norms})
    lines = ["| adapter | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for name, norms in result.items():
        lines.append(f"| {name} | " + " | ".join(f"{norms[t]['mean']:.2f}" if t in norms else "-" for t in types) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.delta_norms", description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="PEFT LoRA adapter folders.")
    p.add_argument("--output", type=Path, default=None, help="Write {folder: {type: {mean, n}}} as JSON here.")
    args = p.parse_args(argv)
    result = {str(f): delta_norms(f) for f in args.folders}
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
