"""How far each method's update moves while it trains: the diagnostic behind "why FlexLoRA's answer transition is late".

    python -m benchmarks.motion --method flexlora --seed 1 --stop 130 --output benchmarks/results/motion_intent_s1_flexlora.json
    python -m benchmarks.motion --method lora     --seed 1 --stop 130 --output benchmarks/results/motion_intent_s1_lora.json
    python -m benchmarks.motion --table benchmarks/results/motion_intent_s1_*.json   # markdown, per 10-step window

Trains exactly one run of the decoder check (`benchmarks.decoder_check`: SmolLM2-135M 4-bit, the commonsense recipe,
same settings, flags and training rows; its ``--work-dir`` is prepared on first use) and stops after ``--stop``
optimizer steps (the LR schedule is still the full run's). After every optimizer step it measures, per module type
(``q_proj``, ``up_proj``, ...; mean over the 30 layers):

* ``dW``: ||ΔW||_F, with ΔW = scaling · P diag(λ) Q (FlexLoRA) or scaling · B A (PEFT LoRA, `get_delta_weight`);
* ``step``: ||ΔW_t - ΔW_{t-1}||_F, how far the update moved in that step;
* ``out_rel`` / ``in_rel``: the relative change of the output factor (P or B) and the input factor (Q or A);

and per window of ``--window`` steps ``path`` (the sum of ``step``), ``net`` (||ΔW_end - ΔW_start||_F) and ``eff`` =
net / path (1: every step went the same way). No lm-eval (the stopped adapter is saved under the work dir):
~13 min for 130 steps on one thread.

``--lam-beta2`` sets Adam's β2 of λ's param groups at train start (a diagnostic for "does Adam's second moment,
which remembers the large gradients of the first steps, damp λ later?"; not a library option).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import offline_env, setup_logging
from .decoder_check import Settings, _example, finetune_argv, prepare, train_path

logger = logging.getLogger("benchmarks.motion")

TYPES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def adapter_factors(model: Any) -> dict[str, tuple[Any, Any, Any]]:
    """{module path: (ΔW (out, in), output factor, input factor)} for every FlexLoRA or PEFT LoRA layer, detached."""
    from peft.tuners.lora import LoraLayer

    from flexlora_hf.adapter.layer import FlexLoRALayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FlexLoRALayer):
            r = module.rank
            out[name] = (
                module.delta_weight(),
                module.lora_P.detach()[:, :r].clone(),
                module.lora_Q.detach()[:r].clone(),
            )
        elif isinstance(module, LoraLayer) and "default" in module.lora_A:
            delta = module.get_delta_weight("default").detach().float()  # (out, in), scaling included
            out[name] = (
                delta,
                module.lora_B["default"].weight.detach().clone(),
                module.lora_A["default"].weight.detach().clone(),
            )
    return out


def motion_callback(stop: int, window: int = 10, lam_beta2: float | None = None) -> Any:
    """A `TrainerCallback` that records the per-step motion (module docstring) in `.rows`, the net move of every
    `window` steps in `.nets` ({end step: {module type: mean ||ΔW_end - ΔW_start||}}), and stops after `stop` steps."""
    from transformers import TrainerCallback

    from flexlora_hf.optim.surgery import lambda_parameters, unwrap_optimizer

    class Motion(TrainerCallback):
        def __init__(self) -> None:
            self.window = window
            self.rows: list[dict[str, float]] = []
            self.nets: dict[int, dict[str, float]] = {}
            self.prev: dict[str, tuple[Any, Any, Any]] = {}  # the previous step's (ΔW, out factor, in factor)
            self.snapshot: dict[str, Any] = {}  # ΔW at the last window boundary (only that one is kept: ~280 MB)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
            if lam_beta2 is None:
                return
            lam = {id(p) for p in lambda_parameters(model)}
            for group in unwrap_optimizer(optimizer).param_groups:
                if any(id(p) in lam for p in group["params"]):
                    group["betas"] = (group["betas"][0], lam_beta2)

        def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            current = adapter_factors(model)
            step = state.global_step
            sums: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            for name, (delta, out_f, in_f) in current.items():
                kind = name.rsplit(".", 1)[-1]
                counts[f"{kind}|dW"] += 1
                sums[f"{kind}|dW"] += float(delta.norm())
                before = self.prev.get(name)
                if before is None:
                    continue
                counts[f"{kind}|step"] += 1
                sums[f"{kind}|step"] += float((delta - before[0]).norm())  # ΔW is (out, in) whatever the rank
                if before[1].shape == out_f.shape:  # factors: only where an event did not change the rank
                    for key, now, then in (("out_rel", out_f, before[1]), ("in_rel", in_f, before[2])):
                        counts[f"{kind}|{key}"] += 1
                        sums[f"{kind}|{key}"] += float((now - then).norm() / then.norm().clamp_min(1e-12))
            row: dict[str, float] = {"step": step}
            row.update({key: value / counts[key] for key, value in sums.items()})
            self.rows.append(row)
            self.prev = current
            if step % self.window == 0:
                if self.snapshot:
                    nets: dict[str, list[float]] = defaultdict(list)
                    for name, (delta, _, _) in current.items():
                        nets[name.rsplit(".", 1)[-1]].append(float((delta - self.snapshot[name]).norm()))
                    self.nets[step] = {kind: sum(v) / len(v) for kind, v in nets.items()}
                self.snapshot = {name: v[0] for name, v in current.items()}
                logger.info("step %d: %s", step, {k: round(v, 4) for k, v in row.items() if k.startswith("q_proj")})
            if step >= stop:
                control.should_training_stop = True

    return Motion()


def windows(callback: Any) -> list[dict[str, Any]]:
    """Per window of `callback.window` steps: path, net, eff and ||ΔW|| at its end, per module type."""
    by_step = {int(r["step"]): r for r in callback.rows}
    out = []
    for end, net in sorted(callback.nets.items()):
        start = end - callback.window
        entry: dict[str, Any] = {"from": start, "to": end}
        for kind in net:
            path = sum(by_step[s].get(f"{kind}|step", 0.0) for s in range(start + 1, end + 1))
            entry[kind] = {"dW": by_step[end][f"{kind}|dW"], "path": path, "net": net[kind],
                           "eff": net[kind] / path if path else None}  # fmt: skip
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(flexlora_flags=args.flexlora_flags) if args.flexlora_flags is not None else Settings()
    prepare(argparse.Namespace(work_dir=args.work_dir), settings)
    base = (args.work_dir / "base_path.txt").read_text().strip()
    out_dir = args.work_dir / f"motion-{args.method}-s{args.seed}"
    argv = finetune_argv(settings, args.method, args.seed, base, train_path(args.work_dir, settings), out_dir)
    argv += ["--logging_steps", str(args.window)] + shlex.split(args.extra_flags)  # the loss at every window's end
    callback = motion_callback(args.stop, args.window, args.lam_beta2)
    trainer_log: list[dict[str, Any]] = []
    finetune = _example("finetune")
    finetune.main(argv, callbacks=[callback, _log_recorder(trainer_log)])
    result = {
        "method": args.method, "seed": args.seed, "stop": args.stop, "lam_beta2": args.lam_beta2,
        "extra_flags": args.extra_flags, "settings": settings.__dict__, "finetune_argv": argv,
        "loss_curve": [[e["step"], e["loss"]] for e in trainer_log if "loss" in e],
        "windows": windows(callback), "steps": callback.rows,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("Wrote %s", args.output)
    return result


def _log_recorder(sink: list[dict[str, Any]]) -> Any:
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs:
                sink.append({"step": state.global_step, **logs})

    return Recorder()


def format_table(results: Sequence[dict[str, Any]], kind: str = "q_proj") -> str:
    """Markdown: per window, path / net / ||ΔW|| of `kind` for each result, and the training loss at the window's end."""
    header = "| steps | " + " | ".join(f"{_label(r)}: path / net / ‖ΔW‖ / loss" for r in results) + " |"
    lines = [header, "|---|" + "---|" * len(results)]
    spans = sorted({(w["from"], w["to"]) for r in results for w in r["windows"]})
    for start, end in spans:
        cells = []
        for r in results:
            w = next((w for w in r["windows"] if (w["from"], w["to"]) == (start, end)), None)
            loss = dict((int(s), v) for s, v in r["loss_curve"]).get(end)
            loss_text = f"{float(loss):.3f}" if loss is not None else "-"
            cells.append(
                f"{w[kind]['path']:.3f} / {w[kind]['net']:.3f} / {w[kind]['dW']:.2f} / {loss_text}" if w else "-"
            )
        lines.append(f"| {start}-{end} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(result: dict[str, Any]) -> str:
    extra = f" β2(λ) {result['lam_beta2']:g}" if result.get("lam_beta2") else ""
    extra += f" {result['extra_flags']}" if result.get("extra_flags") else ""
    return f"{result['method']} s{result['seed']}{extra}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("flexlora", "lora"), default="flexlora")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stop", type=int, default=130, help="Optimizer steps to run (of the check's 200-step schedule).")
    p.add_argument("--window", type=int, default=10, help="Steps per window (and the Trainer's logging interval).")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/decoder_intent_200"))
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--flexlora-flags", default=None, help="As in benchmarks.decoder_check (default: its default).")
    p.add_argument(
        "--extra-flags", default="", help="More finetune.py flags, after the check's (e.g. --orth_reg_weight 0)."
    )
    p.add_argument("--lam-beta2", type=float, default=None, help="Adam β2 of λ's groups (diagnostic).")
    p.add_argument(
        "--table", nargs="+", type=Path, default=None, help="Print the markdown table of these result files."
    )
    p.add_argument("--kind", default="q_proj", choices=TYPES, help="Module type of the table.")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error("--window must be at least 1.")
    if args.table is None and args.output is None:
        args.output = Path(f"benchmarks/results/motion_intent_s{args.seed}_{args.method}.json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.table:
        print(format_table([json.loads(path.read_text()) for path in args.table], args.kind))  # noqa: T201 -- CLI output
        return 0
    offline_env()
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
