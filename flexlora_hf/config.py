"""`FlexLoRAConfig`: every hyper-parameter of entropy-guided FlexLoRA, validated, with help strings.

The dataclass is the single source of truth for adapter shape (``r``, ``lora_alpha``, targets), the reallocation
schedule (eq. 4: ``b0``, ``t_warmup``, ``t_final``, ``delta_t``, ``total_steps``), the regulariser (eq. 2: γ) and
the paper's ablation switches (Tables 4-6, App. G). ``HfArgumentParser`` turns it into command-line flags, and it
round-trips through JSON (``to_dict`` / ``from_dict`` / ``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .choices import (  # noqa: F401 -- also re-exported: their historical home
    ALLOCATIONS,
    CONTROL_METRICS,
    EXPANSION_INITS,
    IMPORTANCE_METRICS,
    INIT_BASES,
    REGEX_PREFIX,
    SCHEDULES,
    _check_choice,
    _check_integer,
    _check_real,
    check_steps,
    is_integer,
    parse_max_rank,
    parse_module_list,
    steps_of,
)
from .constants import CONFIG_NAME, ENTROPY_EPS, GAUSSIAN_INIT_STD, SMALL_INIT_VALUE

logger = logging.getLogger(__name__)

# Integer fields: (name, minimum, how to fix); total_steps may also be None.
_INTEGER_FIELDS = (
    ("r", 1, "e.g. r=8"),
    ("b0", 0, "paper uses 4"),
    ("total_steps", 1, "or None to take the Trainer's max_steps"),
    ("seed", None, "e.g. seed=0"),
)
_REAL_FIELDS = ("lora_alpha", "lora_dropout", "orth_reg_weight")
# Fields a config no longer has -> the behaviour that replaced each (switches that measured as no-ops or losers,
# folded into the one behaviour kept; docs/design.md "Folded switches"). Saved configs that name them still load.
REMOVED_FIELDS: dict[str, Any] = {
    "init_from_gradient": False,  # gradient-aligned start: measured no gain
    "basis_lr_ratio": 1.0,  # P and Q at the optimizer's rate (the paper's single rate)
    "lam_lr_rule": "constant",  # λ at the optimizer's rate
    "lam_lr_ratio": 1.0,
    "init_scale": GAUSSIAN_INIT_STD,  # std of the gaussian basis: AdaLoRA's
    "small_init_value": SMALL_INIT_VALUE,  # λ of a new direction under expansion_init="small"
    "entropy_eps": ENTROPY_EPS,  # ε of eq. 3
    "min_rank": 1,  # no matrix is pruned below rank 1 (the paper)
    "adam_reset": "slot_age",  # each new direction is bias-corrected by its own age
}
_REMOVED_WARNED: set[tuple[str, str]] = set()
# (b0, allocation, n_modules) combinations already warned about: one warning per configuration, not per event or
# per call (`get_flexlora_model` and the Trainer's start both validate the same budget).
_CLAMP_WARNED: set[tuple[int, str, int]] = set()



def _log_removed(removed: dict[str, Any]) -> None:
    """One log line per distinct set of removed keys: info if each held the kept behaviour, else a warning."""
    changed = {k: v for k, v in removed.items() if v != REMOVED_FIELDS[k]}
    key = (",".join(sorted(removed)), repr(sorted(changed.items())))
    if key in _REMOVED_WARNED:
        return
    _REMOVED_WARNED.add(key)
    if not changed:
        logger.info("FlexLoRAConfig: ignoring removed field(s) %s; they held the behaviour kept.", ", ".join(removed))
        return
    logger.warning(
        "FlexLoRAConfig: ignoring removed field(s) %s. The saved adapter loads unchanged, but continued training "
        "differs from the run that saved it: %s.",
        ", ".join(removed),
        "; ".join(f"{k}={v!r} is now {REMOVED_FIELDS[k]!r}" for k, v in changed.items()),
    )


@dataclass
class FlexLoRAConfig:
    """Configuration of a FlexLoRA adapter and of its rank reallocation schedule.

    Field names follow PEFT's `LoraConfig` where the concept is the same (`r`, `lora_alpha`, `lora_dropout`,
    `target_modules`, `modules_to_save`) and the paper's notation otherwise (`b0` is the paper's *b*, `t_warmup`,
    `t_final`, `delta_t` are T_warmup, T_final and Δ_T of Appendix D). Invalid values raise `ValueError` naming the
    field and the fix.
    """

    r: int = field(default=8, metadata={"help": "Initial rank of every adapted matrix (paper: r)."})
    lora_alpha: float = field(
        default=16.0,
        metadata={"help": "Scaling numerator: ΔW is scaled by lora_alpha / r with the *initial* r, fixed for the run."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout applied to the adapter input."})
    # Typed as a list so HfArgumentParser gives `--target_modules q_proj v_proj` (or `q_proj,v_proj`); a plain
    # string (a regex, as in PEFT) is accepted from Python.
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: names (suffix match, as in PEFT; space- or comma-separated on the command "
            "line), 'all-linear' (every linear layer except the output head and modules_to_save), or from Python a "
            "regex string (full match on the module path). None means 'all-linear'."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra modules (e.g. a classifier head) that are trained in full and saved with the adapter."
        },
    )
    b0: int = field(
        default=4, metadata={"help": "Paper's b: the largest number of directions pruned and expanded per event."}
    )
    # Typed float so HfArgumentParser accepts both `--t_warmup 500` and `--t_warmup 0.1` (validated by check_steps).
    t_warmup: float = field(
        default=500,
        metadata={
            "help": "Steps before the first reallocation event (paper: T_warmup), or a fraction of the run in (0, 1)."
        },
    )
    t_final: float = field(
        default=500,
        metadata={"help": "Steps at the end with frozen ranks (paper: T_final), or a fraction of the run in (0, 1)."},
    )
    delta_t: float = field(
        default=100,
        metadata={"help": "Steps between reallocation events (paper: Δ_T), or a fraction of the run in (0, 1)."},
    )
    total_steps: int | None = field(
        default=None,
        metadata={
            "help": "Total optimizer steps T. Leave unset with FlexLoRATrainer: it uses the Trainer's max_steps."
        },
    )
    orth_reg_weight: float = field(
        default=0.1,
        metadata={
            "help": "γ, weight of the orthogonality regulariser of eq. 2 (the paper gives no value; 0.1 is AdaLoRA's "
            "GLUE setting)."
        },
    )
    max_rank: int | None = field(
        default=None,
        metadata={
            "help": "Per-module rank cap (int, or mapping module path -> int). None derives the exact cap "
            "r + number of scheduled events, bounded by min(d_in, d_out)."
        },
    )
    importance: str = field(
        default="entropy",
        metadata={
            "help": f"Importance metric: one of {', '.join(IMPORTANCE_METRICS)} (eq. 3; Table 4; App. G), of each "
            "matrix's real ΔW spectrum; 'random' is a control (uniform scores drawn per event, same budget)."
        },
    )
    allocation: str = field(
        default="bidirectional",
        metadata={"help": f"Reallocation mode: one of {', '.join(ALLOCATIONS)} (Table 5)."},
    )
    expansion_init: str = field(
        default="zero_impact",
        metadata={"help": f"Initialisation of new directions: one of {', '.join(EXPANSION_INITS)} (Table 6)."},
    )
    svd_prune: bool = field(
        default=True,
        metadata={
            "help": "Before pruning a matrix, rotate its directions onto ΔW's SVD (ΔW unchanged), so the pruned "
            "direction is the weakest singular one (Eckart-Young). False: prune the smallest |λ|·||p||·||q|| as is."
        },
    )
    grace_events: int = field(
        default=1,
        metadata={
            "help": "Events after a matrix gains a direction during which it is not pruned, so a new zero-impact "
            "direction cannot by itself make its matrix the next prune target (0: the paper, no grace)."
        },
    )
    schedule: str = field(
        default="paper",
        metadata={
            "help": "Budget curve b(t): 'paper' is eq. 4 literally; 'window' normalises the cubic over the "
            "reallocation window so it reaches 0 at T - t_final (AdaLoRA's shape); 'constant' keeps b0."
        },
    )
    init_basis: str = field(
        default="lora_like",
        metadata={
            "help": "Initial directions (the paper specifies none; ΔW = 0 with each): 'lora_like' (P = 0, "
            "λ = 1/sqrt(3), Q orthonormal: PEFT LoRA's B = 0 / A start, P learns from step one), 'orthonormal' "
            "(λ = 0, P, Q orthonormal: zero impact through λ) or 'gaussian' (λ = 0, P, Q ~ N(0, 0.02²): "
            "AdaLoRA's). New directions: λ = 0."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for initial directions and for every expansion draw."})

    def __post_init__(self) -> None:
        # A plain string from Python is a regex (as in PEFT) or "all-linear"; lists are normalised.
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if not isinstance(value, str):
                try:
                    setattr(self, name, parse_module_list(value))
                except ValueError as err:
                    raise ValueError(f"FlexLoRAConfig.{name}: {err}") from None
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, n_modules: int | None = None) -> None:
        """Check every field; with `n_modules` also check the budget against the number of adapted matrices.

        Integer fields (`r`, `b0`, `t_warmup`, `t_final`, `delta_t`, `total_steps`, `max_rank` caps,
        `seed`) must be integers: `True` or `100.0` (e.g. from a hand-edited JSON file) are refused, since a float
        `delta_t` breaks the event grid. With `n_modules`, a `b0` larger than the moves one event can make
        (⌊n/2⌋ prune/expand pairs for `bidirectional`, n otherwise) is clamped, as the paper does (§4.2): the
        planner simply stops when the candidates run out, and one warning says so. Only a budget that can never
        move anything (bidirectional with a single adapted matrix) raises.

        Raises:
            ValueError: naming the field, the offending value and the fix.
        """
        for name, minimum, fix in _INTEGER_FIELDS:
            if not (name == "total_steps" and self.total_steps is None):
                _check_integer(name, getattr(self, name), minimum, fix)
                setattr(self, name, int(getattr(self, name)))  # NumPy ints -> int: the config stays JSON-serialisable
        for name, minimum in (("t_warmup", 0), ("t_final", 0), ("delta_t", 1)):
            setattr(self, name, check_steps(name, getattr(self, name), minimum))
        _check_integer("grace_events", self.grace_events, 0, "1 skips one event; 0 is the paper")
        for name in _REAL_FIELDS:
            _check_real(name, getattr(self, name))
        if self.lora_alpha <= 0:
            raise ValueError(f"FlexLoRAConfig.lora_alpha={self.lora_alpha!r} must be > 0 (paper uses 16).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"FlexLoRAConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        window = self.total_steps is not None and self.b0 > 0  # a fixed-rank adapter (b0 = 0) needs no window
        if window and sum(self.steps()[k] for k in ("t_warmup", "t_final")) >= (self.total_steps or 0):
            raise ValueError(
                f"FlexLoRAConfig: t_warmup + t_final = {self.t_warmup} + {self.t_final} >= total_steps = "
                f"{self.total_steps}, so no reallocation can happen. Lower t_warmup/t_final or train longer."
            )
        if self.orth_reg_weight < 0:
            raise ValueError(f"FlexLoRAConfig.orth_reg_weight={self.orth_reg_weight!r} must be >= 0.")
        caps = self.max_rank.items() if isinstance(self.max_rank, Mapping) else [("", self.max_rank)]
        for key, cap in caps:
            if not isinstance(key, str):
                raise ValueError(f"FlexLoRAConfig.max_rank key {key!r} must be a module path (a string).")
            if cap is not None or key:
                _check_integer(f"max_rank[{key!r}]" if key else "max_rank", cap, self.r, "or None to derive it")
        _check_choice("importance", self.importance, IMPORTANCE_METRICS + CONTROL_METRICS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_choice("expansion_init", self.expansion_init, EXPANSION_INITS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("init_basis", self.init_basis, INIT_BASES)
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            names_ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            if not (value is None or isinstance(value, str) or names_ok):
                raise ValueError(f"FlexLoRAConfig.{name}={value!r} must be None, a string or a list of module names.")
        if n_modules is not None:
            self._check_budget(n_modules)

    def _check_budget(self, n_modules: int) -> None:
        """Clamp b0 to the moves `n_modules` adapted matrices allow (warn once); raise if no move is ever possible."""
        if self.b0 == 0:
            return
        bidirectional = self.allocation == "bidirectional"
        per_move = 2 if bidirectional else 1  # a bidirectional move prunes one matrix and expands another
        if n_modules < per_move:
            raise ValueError(
                f"FlexLoRAConfig.b0={self.b0} with allocation={self.allocation!r} needs at least {per_move} adapted "
                f"matrices to move any rank, but the model has {n_modules}. Target more modules, or set b0=0 to "
                "train a fixed-rank adapter."
            )
        usable = n_modules // per_move
        key = (int(self.b0), str(self.allocation), int(n_modules))
        if self.b0 > usable and key not in _CLAMP_WARNED:
            _CLAMP_WARNED.add(key)
            moves = "prune/expand pairs" if bidirectional else f"{self.allocation} moves"
            logger.warning(
                "FlexLoRAConfig.b0=%d asks for up to %d %s per event but only %d adapted matrices exist: each event "
                "makes at most %d (b(t) is clamped to the modules available, paper §4.2). Set b0=%d to silence this.",
                self.b0, self.b0, moves, n_modules, usable, usable,
            )

    def steps(self) -> dict[str, int]:
        """`t_warmup`, `t_final`, `delta_t` in optimizer steps (fractions resolved against `total_steps`)."""
        if self.total_steps is None:
            raise ValueError("FlexLoRAConfig.total_steps is unset: the schedule needs the run's total optimizer steps.")
        T = self.total_steps
        return {
            "t_warmup": steps_of(self.t_warmup, T),
            "t_final": steps_of(self.t_final, T),
            "delta_t": steps_of(self.delta_t, T, minimum=1),
        }

    def schedule_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `budget_at` (needs `total_steps`); `grid_kwargs` adds `delta_t`."""
        steps = self.steps()
        return dict(
            b0=self.b0,
            t_warmup=steps["t_warmup"],
            t_final=steps["t_final"],
            total_steps=self.total_steps,
            schedule=self.schedule,
        )

    def grid_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `is_event_step` / `event_steps`: `schedule_kwargs` plus `delta_t` in steps."""
        return {**self.schedule_kwargs(), "delta_t": self.steps()["delta_t"]}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        out = dataclasses.asdict(self)
        if isinstance(out["target_modules"], (set, tuple)):
            out["target_modules"] = sorted(out["target_modules"])
        if isinstance(out["modules_to_save"], (set, tuple)):
            out["modules_to_save"] = list(out["modules_to_save"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlexLoRAConfig:
        """Build a config from `to_dict()` output; unknown keys raise so typos are not silently ignored.

        Keys of fields the config no longer has ([`REMOVED_FIELDS`], from older adapter folders and checkpoints) are
        dropped, with one log line per set of keys; a value other than the behaviour that replaced it is a warning,
        since continued training then differs from the run that wrote it (the saved weights load unchanged).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        removed = {k: data[k] for k in REMOVED_FIELDS if k in data}
        if removed:
            data = {k: v for k, v in data.items() if k not in removed}
            _log_removed(removed)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"Unknown FlexLoRAConfig field(s): {', '.join(unknown)}. Known: {', '.join(sorted(names))}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(self.to_json_string() + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FlexLoRAConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: not a FlexLoRA adapter directory.")
        with open(path) as f:
            data = json.load(f)
        return cls.from_dict({k: v for k, v in data.items() if not k.startswith("_")})

    def resolved(self, total_steps: int) -> FlexLoRAConfig:
        """A copy with `total_steps` filled in (and validated against the window)."""
        return dataclasses.replace(self, total_steps=total_steps)
