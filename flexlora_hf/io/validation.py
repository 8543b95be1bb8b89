"""Validation of an adapter folder before anything is allocated: JSON values, safetensors headers, tensor values.

Owns every check between the bytes of a native adapter folder and a tensor allocation in `io/native.py`. A damaged
or hostile folder (a truncated file, flipped bytes, slot 10^9 or `_capacity` 10^9, a header that lies about shapes,
strings where integers belong, NaN weights) must fail with a `ValueError` (or `FileNotFoundError`) naming the file
and the module, never with a huge allocation, a crash deep inside torch or a silently wrong adapter. The order of the
checks is the point:

1. JSON files: the type and range of every number (`rank_map.json`, `_capacity`, `_slot_birth`, `rank_history.json`).
2. The safetensors header (names, dtypes, shapes), read with `safe_open` without loading a tensor: every module
   complete, shapes consistent with each other and with `rank_map.json`, bytes claimed within the file's size.
   Capacities are then bounded by min(d_in, d_out) of the tensors' own shapes (the base model's, once it is known),
   so the slots a layer allocates never exceed those of a full-rank adapter of that layer.
3. Only then are the tensors loaded (at most the file's size) and their values checked: integer slots in
   [0, capacity) without repeats, finite P, λ, Q and modules_to_save weights.

Non-finite weights are refused, not loaded with a warning: a NaN or inf anywhere in P, λ or Q makes every output of
the adapted model NaN or inf, no training run saves one on purpose, and a warning is easily missed by a batch job
that then writes NaN predictions or resumes training from a broken state. The error names the module and tensor so
the damaged file (or the diverged run that wrote it) can be found; delete or retrain that adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..choices import is_integer
from ..constants import FLEXLORA_WEIGHTS_NAME, MODULES_TO_SAVE_PREFIX, RANK_MAP_NAME

COMPACT_FIELDS = ("P", "lam", "Q", "slots")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_INT_DTYPES = {"I8", "I16", "I32", "I64", "U8"}
# Bytes per element of every safetensors dtype, to bound what a header claims by the file's size.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2}
_ITEMSIZE |= {"U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}

Header = dict[str, tuple[str, tuple[int, ...]]]
"""Tensor name -> (safetensors dtype, shape), as a file's header claims them."""


def fail(path: str, message: str) -> ValueError:
    """The one shape of a loading error: `load_flexlora: <file>: <what is wrong and how to fix it>`."""
    return ValueError(f"load_flexlora: {path}: {message}")


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: a hostile file must not blow up the error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_count(value: Any, what: str, path: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """`value` as an `int` in [minimum, maximum]; a bool, float, string or out-of-range number raises."""
    if not is_integer(value):
        raise fail(path, f"{what} must be an integer, got {short(value)} ({type(value).__name__}).")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise fail(path, f"{what} = {short(value)} must be >= {minimum}{upper}; the file is damaged (save or "
                   "download the adapter again).")
    return int(value)


def read_json(directory: str, name: str, *, required: bool = True, who: str = "load_flexlora") -> Any:
    """Parse `directory/name`; a missing required file raises `FileNotFoundError`, bad JSON a `ValueError`; `who`
    (the public function reading it) starts the message."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(
                f"{who}: {name} is missing from {directory}; it is not a complete FlexLoRA adapter folder "
                "(save it again with save_pretrained / save_flexlora)."
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and Python's 4300-digit limit on integers; a deeply
    # nested document exhausts the recursion limit.
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{who}: {path} is not valid JSON ({err}); the file is corrupt or truncated.") from err


def check_rank_map(rank_map: Any, path: str) -> dict[str, int]:
    """`rank_map.json`: a JSON object module path -> non-negative integer rank."""
    if not isinstance(rank_map, dict) or not rank_map:
        raise fail(path, "must hold a non-empty JSON object (module path -> rank).")
    return {str(m): check_count(r, f"the rank of module {m!r}", path) for m, r in rank_map.items()}


def _check_str_list(value: Any, what: str, path: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(path, f"{what} must be a list of module paths, got {str(value)[:80]}.")


def check_history(history: Any, path: str) -> list[dict[str, Any]]:
    """`rank_history.json`: a list of records (dicts); the fields every writer uses must have their types."""
    if not isinstance(history, list):
        raise fail(path, f"must hold a JSON list of event records, got {type(history).__name__}.")
    for i, record in enumerate(history):
        what = f"record {i}"
        if not isinstance(record, dict):
            raise fail(path, f"{what} must be a JSON object (step, prune, expand, ranks), got {str(record)[:80]}.")
        for key in ("step", "budget"):
            if key in record:
                check_count(record[key], f"{what} {key!r}", path)
        for key in ("prune", "expand"):
            if key in record:
                _check_str_list(record[key], f"{what} {key!r}", path)
        for key in ("ranks", "rank_map"):
            if key in record:
                if not isinstance(record[key], dict):
                    raise fail(path, f"{what} {key!r} must be a JSON object module path -> rank.")
                for m, r in record[key].items():
                    check_count(r, f"{what} {key!r} of module {m!r}", path)
        scores = record.get("scores", {})
        if not isinstance(scores, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
        ):
            raise fail(path, f"{what} 'scores' must be a JSON object module path -> number.")
    return history


def check_capacities(
    raw: Mapping[str, Any], path: str, shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], r: int
) -> dict[str, int]:
    """`_capacity` of `flexlora_config.json`: one integer per adapted module in [rank, min(d_in, d_out)].

    Returns the capacity to rebuild each layer with (at least the config's `r`, which the layer is built with).
    """
    saved = raw.get("_capacity")
    if not isinstance(saved, dict):
        raise fail(path, "has no '_capacity' mapping (module path -> slot capacity).")
    unknown = sorted(set(saved) - set(shapes))
    if unknown:
        raise fail(path, f"'_capacity' names modules the adapter does not hold: {unknown[:5]}.")
    capacity: dict[str, int] = {}
    for module, (d_out, d_in) in shapes.items():
        if module not in saved:
            raise fail(path, f"module {module!r} has no '_capacity' entry.")
        bound = min(d_in, d_out)
        what = f"'_capacity' of module {module!r} (a {d_out} x {d_in} layer holding {ranks[module]} directions)"
        cap = check_count(saved[module], what, path, minimum=ranks[module], maximum=bound)
        if r > bound:
            raise fail(path, f"r={r} exceeds min(d_in, d_out)={bound} of module {module!r}; lower r.")
        capacity[module] = max(cap, r)
    return capacity


def check_slot_birth(raw: Mapping[str, Any], path: str, ranks: Mapping[str, int]) -> dict[str, dict[int, int]]:
    """`_slot_birth` of `flexlora_config.json`: module -> {slot: optimizer step}, slots among the active ones."""
    births = raw.get("_slot_birth", {})
    if not isinstance(births, dict):
        raise fail(path, "'_slot_birth' must be a JSON object module path -> {slot: step}.")
    out: dict[str, dict[int, int]] = {}
    for module, table in births.items():
        if module not in ranks:
            raise fail(path, f"'_slot_birth' names module {short(module)}, which the adapter does not hold.")
        if not isinstance(table, dict):
            raise fail(path, f"'_slot_birth' of module {module!r} must be a JSON object slot -> step.")
        out[module] = {}
        for slot, step in table.items():
            what = f"'_slot_birth' slot {short(slot, 24)} of module {module!r}"
            text = slot.strip() if isinstance(slot, str) else ""
            if not (text.isascii() and text.isdigit() and len(text) <= 18):
                raise fail(path, f"{what} must be a slot number (a string of digits).")
            index = check_count(int(text), what, path, maximum=ranks[module] - 1)
            out[module][index] = check_count(step, f"the birth step of {what}", path)
    return out


def read_header(path: str) -> Header:
    """Names, dtypes and shapes of a safetensors file, without loading a tensor.

    Raises:
        ValueError: the header is unreadable, or claims more bytes than the file holds.
    """
    try:
        with safe_open(path, framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise fail(path, f"cannot read the header ({err}); the file is truncated or corrupt. Save or download "
                   "the adapter again.") from err
    claimed = sum(math.prod(shape) * _ITEMSIZE.get(dtype, 8) for dtype, shape in header.values())
    if claimed > os.path.getsize(path):
        raise fail(path, f"the header claims {claimed} bytes of tensors but the file has {os.path.getsize(path)}; "
                   "the file is truncated or corrupt.")
    return header


def check_header(header: Header, path: str, ranks: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Check the adapter tensors a header announces against `rank_map.json`; returns module -> (d_out, d_in).

    Per module: `P` (d_out, r), `lam` (r,), `Q` (r, d_in) floating point and `slots` (r,) integer, with r the rank of
    `rank_map.json` and r <= min(d_in, d_out). `modules_to_save.*` entries are checked against the model later.
    """
    found: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, entry in header.items():
        if key.startswith(MODULES_TO_SAVE_PREFIX):
            continue
        module, _, field = key.rpartition(".")
        if not module or field not in COMPACT_FIELDS:
            raise fail(path, f"unexpected tensor {key!r}.")
        found.setdefault(module, {})[field] = entry
    for module in ranks:
        if module not in found:
            raise fail(path, f"{RANK_MAP_NAME} lists module {module!r} but {FLEXLORA_WEIGHTS_NAME} holds no tensors "
                       "for it; the folder mixes files from different saves.")
    for module, parts in found.items():
        if module not in ranks:
            raise fail(path, f"module {module!r} of {FLEXLORA_WEIGHTS_NAME} is missing from {RANK_MAP_NAME}.")
        missing = [f for f in COMPACT_FIELDS if f not in parts]
        if missing:
            raise fail(path, f"lacks {', '.join(missing)} for module {module!r}.")
    shapes: dict[str, tuple[int, int]] = {}
    for module, r in ranks.items():
        parts = found[module]
        (p_dtype, P), (l_dtype, lam), (q_dtype, Q), (s_dtype, slots) = (parts[f] for f in COMPACT_FIELDS)
        described = f"P {P}, lam {lam}, Q {Q}, slots {slots}"
        if len(P) != 2 or len(lam) != 1 or len(Q) != 2 or len(slots) != 1:
            raise fail(path, f"module {module!r} has tensors of the wrong dimensionality ({described}).")
        if P[1] != lam[0] or Q[0] != lam[0] or slots[0] != lam[0]:
            raise fail(path, f"module {module!r} has inconsistent ranks: {described}.")
        if lam[0] != r:
            raise fail(path, f"{RANK_MAP_NAME} says module {module!r} has rank {r} but {FLEXLORA_WEIGHTS_NAME} holds "
                       f"{lam[0]} directions for it; the folder mixes files from different saves.")
        bad = {n: d for n, d in (("P", p_dtype), ("lam", l_dtype), ("Q", q_dtype)) if d not in _FLOAT_DTYPES}
        if bad:
            raise fail(path, f"module {module!r} has non-floating-point tensors {bad}; P, lam and Q must be floats.")
        if s_dtype not in _INT_DTYPES:
            raise fail(path, f"module {module!r} has slots of dtype {s_dtype}; slots must be integers (I64).")
        d_out, d_in = P[0], Q[1]
        if min(d_out, d_in) < max(r, 1):
            raise fail(path, f"module {module!r} holds {r} directions of a ({d_out} x {d_in}) layer; at most "
                       "min(d_in, d_out) are possible.")
        shapes[module] = (d_out, d_in)
    return shapes


def load_tensors(path: str, header: Header) -> dict[str, torch.Tensor]:
    """Load a safetensors file whose header was checked (so at most the file's size is allocated)."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise fail(path, f"cannot read it ({err}); the file is truncated or corrupt. Save or download the adapter "
                   "again.") from err
    if {k: tuple(t.shape) for k, t in tensors.items()} != {k: shape for k, (_, shape) in header.items()}:
        raise fail(path, "the file changed while it was read; load it again.")
    return tensors


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], path: str, owner: str) -> None:
    """Refuse NaN / inf (see the module docstring for why they are refused rather than loaded with a warning)."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise fail(path, f"{owner} has non-finite values (NaN or inf) in {name}; the adapter is broken (a "
                       "diverged run or a damaged file). Load an earlier checkpoint or retrain.")


def check_module_values(module: str, parts: Mapping[str, torch.Tensor], capacity: int, path: str) -> None:
    """Slots of one module: integers in [0, capacity), no slot twice; P, λ, Q finite."""
    slots = parts["slots"].to(torch.int64)
    if slots.numel():
        low, high = int(slots.min()), int(slots.max())
        if low < 0 or high >= capacity or int(torch.unique(slots).numel()) != slots.numel():
            shown = slots.tolist()[:16]
            raise fail(path, f"module {module!r} has invalid slots {shown}: they must be distinct integers in "
                       f"[0, {capacity}) (its capacity); the file is damaged.")
    check_finite(((f, parts[f]) for f in ("P", "lam", "Q")), path, f"module {module!r}")
