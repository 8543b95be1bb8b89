"""Hostile or corrupt adapter folders: a fuzz over REAL saved folders, damaged in 171 ways (the `CASES` table).

A tiny trained Llama adapter (and a BERT classifier with a modules_to_save head) is saved with `save_pretrained`;
each case copies the native files, damages them (truncation at many offsets, flipped header bytes, huge or negative
indices, header and tensor shape lies, wrong dtypes, missing files and tensors, JSON of the wrong types, NaN/inf
values) and loads the copy onto a fresh base model. Every case must raise `ValueError` or `FileNotFoundError` whose
message names the damaged file (and the module, where one is at fault) in under 2000 characters, leave the base
model untouched, and do so under an address-space ceiling of current size + 512 MiB: a loader that trusted a
capacity or slot of 10^9 would try to allocate a (d_out x 10^9) tensor and fail with a RuntimeError instead.
Parametrize ids say what each case damages (`pytest --collect-only -q tests/test_hostile_files.py` lists them).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_bert, tiny_llama, trained
from safetensors.torch import load_file, save_file

from flexlora_hf import load_flexlora
from flexlora_hf.adapter.layer import FlexLoRALayer
from flexlora_hf.io.native import load_adapter_into

W, C, R, H = "flexlora_adapter.safetensors", "flexlora_config.json", "rank_map.json", "rank_history.json"
NATIVE = (W, C, R, H)
M = "model.layers.0.mlp.down_proj"  # rank 5 of 7 slots after `trained`, one young slot (4), a (32 x 64) layer
CEILING = 512 << 20  # bytes the loader may add to the address space


# ------------------------------------------------------------------------------------------------------ damaging
Damage = Callable[[Path], None]


def edit_json(name: str, change: Callable[[Any], Any]) -> Damage:
    """Rewrite a JSON file after `change(data)` mutated it in place (its return value is ignored)."""

    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return damage


def config_field(key: str, value: Any) -> Damage:
    return edit_json(C, lambda d: d.__setitem__(key, value))


def capacity_of(value: Any, module: str = M) -> Damage:
    return edit_json(C, lambda d: d["_capacity"].__setitem__(module, value))


def write_text(name: str, text: str) -> Damage:
    return lambda folder: (folder / name).write_text(text)


def truncate(name: str, where: Callable[[bytes], int]) -> Damage:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: where(data)])

    return damage


def flip(name: str, where: Callable[[bytes], int]) -> Damage:
    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[where(bytes(data))] ^= 0xFF
        (folder / name).write_bytes(bytes(data))

    return damage


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Damage:
    """Rewrite the weights file with real tensors of other shapes, dtypes or values (a well-formed file that lies)."""

    def damage(folder: Path) -> None:
        tensors = load_file(folder / W)
        change(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / W, metadata={"format": "pt"})

    return damage


def set_tensor(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Damage:
    return edit_tensors(lambda t: t.__setitem__(key, make(t[key])))


def edit_header(change: Callable[[dict[str, Any]], None]) -> Damage:
    """Rewrite the safetensors header JSON, keeping the data bytes: the header lies about what the data holds."""

    def damage(folder: Path) -> None:
        data = (folder / W).read_bytes()
        n = header_len(data)
        header = json.loads(data[8 : 8 + n])
        change(header)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        (folder / W).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return damage


def header_entry(key: str, field: str, value: Any) -> Damage:
    return edit_header(lambda h: h[key].__setitem__(field, value))


def both(*damages: Damage) -> Damage:
    """Several consistent lies at once (e.g. tensors, rank map and capacity that agree on an impossible rank)."""

    def damage(folder: Path) -> None:
        for one in damages:
            one(folder)

    return damage


def remove(name: str) -> Damage:
    return lambda folder: (folder / name).unlink()


def slot_birth(table: Any, module: str = M) -> Damage:
    return edit_json(C, lambda d: d.setdefault("_slot_birth", {}).__setitem__(module, table))


def history_record(record: Any) -> Damage:
    return edit_json(H, lambda d: d.__setitem__(0, record))


def nan_at(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.view(-1)[out.numel() // 2] = value
        return out

    return make


# ------------------------------------------------------------------------------------------------------ the cases
# (id, damage, exception, substrings the message must contain). Llama cases unless the id starts with "bert-".
FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
CASES: list[tuple[str, Damage, type[Exception], tuple[str, ...]]] = [
    # --- truncation of the weights file at many offsets (header length field, header, data section)
    *[(f"truncate-weights-at-{k}-bytes", truncate(W, lambda d, k=k: k), ValueError, (W, "truncated or corrupt"))
      for k in (0, 1, 4, 7, 8, 9, 16, 64, 255)],
    *[(f"truncate-weights-at-{f:.0%}", truncate(W, lambda d, f=f: int(len(d) * f)), ValueError, (W, "truncated"))
      for f in FRACTIONS],
    ("truncate-weights-end-of-header", truncate(W, lambda d: 8 + header_len(d)), ValueError, (W, "truncated")),
    ("truncate-weights-last-byte", truncate(W, lambda d: len(d) - 1), ValueError, (W, "truncated")),
    # --- truncation of the JSON files
    *[(f"truncate-{name}-at-{f:.0%}", truncate(name, lambda d, f=f: int(len(d) * f)), ValueError, (name, "JSON"))
      for name in (C, R, H) for f in (0.0, 0.1, 0.5, 0.9)],
    # --- flipped bytes: header length field and header JSON of the weights, then slot values in the data section
    *[(f"flip-weights-byte-{k}", flip(W, lambda d, k=k: k), ValueError, (W, "corrupt")) for k in range(8)],
    *[(f"flip-weights-header-{f:.0%}", flip(W, lambda d, f=f: 8 + int(header_len(d) * f)), ValueError, (W,))
      for f in (0.0, 0.1, 0.25, 0.5, 0.75, 0.99)],
    ("flip-config-json-byte", flip(C, lambda d: 0), ValueError, (C, "JSON")),
    ("flip-rank-map-json-byte", flip(R, lambda d: len(d) // 2), ValueError, (R, "JSON")),
    # --- huge or negative indices and capacities
    ("slots-1e9", set_tensor(f"{M}.slots", lambda s: s + 10**9), ValueError, (W, M, "invalid slots")),
    ("slots-2e63", set_tensor(f"{M}.slots", lambda s: s * 0 + (2**63 - 1)), ValueError, (W, M, "invalid slots")),
    ("slots-negative", set_tensor(f"{M}.slots", lambda s: s - 1), ValueError, (W, M, "invalid slots")),
    ("slots-repeated", set_tensor(f"{M}.slots", torch.zeros_like), ValueError, (W, M, "distinct")),
    ("slots-at-capacity", set_tensor(f"{M}.slots", lambda s: s + 3), ValueError, (W, M, "[0, 7)")),
    ("capacity-1e9", capacity_of(10**9), ValueError, (C, M, "_capacity")),
    ("capacity-1e30", capacity_of(10**30), ValueError, (C, M, "_capacity")),
    ("capacity-negative", capacity_of(-1), ValueError, (C, M, "_capacity")),
    ("capacity-below-rank", capacity_of(4), ValueError, (C, M, "_capacity")),
    ("capacity-above-min-d", capacity_of(33), ValueError, (C, M, "<= 32")),
    ("r-1e9", config_field("r", 10**9), ValueError, (C, "r=1000000000 exceeds")),
    ("rank-map-rank-1e9", edit_json(R, lambda d: d.__setitem__(M, 10**9)), ValueError, (R, M)),
    ("rank-map-rank-negative", edit_json(R, lambda d: d.__setitem__(M, -1)), ValueError, (R, M)),
    ("slot-birth-slot-1e9", slot_birth({"1000000000": 30}), ValueError, (C, M, "_slot_birth")),
    ("slot-birth-slot-at-rank", slot_birth({"5": 30}), ValueError, (C, M, "_slot_birth")),
    ("slot-birth-slot-negative", slot_birth({"-1": 30}), ValueError, (C, M, "_slot_birth")),
    ("slot-birth-slot-huge-digits", slot_birth({"9" * 5000: 30}), ValueError, (C, M, "_slot_birth", "...")),
    ("slot-birth-step-negative", slot_birth({"4": -30}), ValueError, (C, M, "birth step")),
    ("history-step-negative", history_record({"step": -1, "ranks": {}}), ValueError, (H, "record 0", "step")),
    # --- shape lies told by real tensors (a well-formed file whose shapes disagree)
    ("P-wrong-d_out", set_tensor(f"{M}.P", lambda p: torch.zeros(33, p.shape[1])), ValueError, (M, "(33 x 64)")),
    ("P-extra-column", set_tensor(f"{M}.P", lambda p: torch.zeros(p.shape[0], 6)), ValueError, (W, M, "inconsistent")),
    ("P-transposed", set_tensor(f"{M}.P", lambda p: p.T), ValueError, (W, M, "inconsistent")),
    ("P-3d", set_tensor(f"{M}.P", lambda p: p[None]), ValueError, (W, M, "dimensionality")),
    ("lam-2d", set_tensor(f"{M}.lam", lambda v: v[None]), ValueError, (W, M, "dimensionality")),
    ("lam-scalar", set_tensor(f"{M}.lam", lambda v: v[0]), ValueError, (W, M, "dimensionality")),
    ("Q-short", set_tensor(f"{M}.Q", lambda q: q[:-1]), ValueError, (W, M, "inconsistent")),
    ("Q-wrong-d_in", set_tensor(f"{M}.Q", lambda q: torch.zeros(q.shape[0], 65)), ValueError, (M, "(32 x 65)")),
    ("slots-short", set_tensor(f"{M}.slots", lambda s: s[:-1]), ValueError, (W, M, "inconsistent")),
    ("rank-above-min-d", both(edit_tensors(lambda t: t.update({
        f"{M}.P": torch.zeros(32, 40), f"{M}.lam": torch.zeros(40), f"{M}.Q": torch.zeros(40, 64),
        f"{M}.slots": torch.arange(40)})), edit_json(R, lambda d: d.__setitem__(M, 40)), capacity_of(40)),
     ValueError, (W, M, "at most min(d_in, d_out)")),
    ("all-ranks-plus-one", edit_json(R, lambda d: d.update({k: v + 1 for k, v in d.items()})), ValueError,
     (R, "has rank")),
    # --- shape and dtype lies told by the header (the data bytes stay)
    ("header-P-transposed", edit_header(lambda h: h[f"{M}.P"].__setitem__("shape", h[f"{M}.P"]["shape"][::-1])),
     ValueError, (W, M, "inconsistent")),
    ("header-P-huge-shape", header_entry(f"{M}.P", "shape", [10**9, 5]), ValueError, (W, "corrupt")),
    ("header-P-huge-offsets", header_entry(f"{M}.P", "data_offsets", [0, 10**12]), ValueError, (W, "corrupt")),
    ("header-length-1e15", lambda f: (f / W).write_bytes(struct.pack("<Q", 10**15) + (f / W).read_bytes()[8:]),
     ValueError, (W, "corrupt")),
    ("header-length-zero", lambda f: (f / W).write_bytes(b"\0" * 8 + (f / W).read_bytes()[8:]), ValueError, (W,)),
    ("header-P-as-I32", header_entry(f"{M}.P", "dtype", "I32"), ValueError, (W, M, "non-floating")),
    ("header-slots-as-F64", header_entry(f"{M}.slots", "dtype", "F64"), ValueError, (W, M, "slots must be integers")),
    ("header-renamed-tensor", edit_header(lambda h: h.__setitem__(f"{M}.X", h.pop(f"{M}.P"))), ValueError,
     (W, f"{M}.X")),
    ("header-garbage", lambda f: (f / W).write_bytes(b"\x08\0\0\0\0\0\0\0{garbage"), ValueError, (W, "corrupt")),
    # --- wrong dtypes of real tensors
    ("P-int32", set_tensor(f"{M}.P", lambda p: p.to(torch.int32)), ValueError, (W, M, "non-floating")),
    ("lam-bool", set_tensor(f"{M}.lam", lambda v: v > 0), ValueError, (W, M, "non-floating")),
    ("Q-int64", set_tensor(f"{M}.Q", lambda q: q.to(torch.int64)), ValueError, (W, M, "non-floating")),
    ("slots-float", set_tensor(f"{M}.slots", lambda s: s.float()), ValueError, (W, M, "slots must be integers")),
    ("slots-bool", set_tensor(f"{M}.slots", lambda s: s > 0), ValueError, (W, M, "slots must be integers")),
    ("slots-int16-huge", set_tensor(f"{M}.slots", lambda s: (s + 30000).to(torch.int16)), ValueError, (W, M)),
    # --- missing files and tensors
    ("missing-config", remove(C), FileNotFoundError, (C, "is missing")),
    ("missing-weights", remove(W), FileNotFoundError, (W, "is missing")),
    ("missing-rank-map", remove(R), FileNotFoundError, (R, "is missing")),
    ("missing-slots-tensor", edit_tensors(lambda t: t.pop(f"{M}.slots")), ValueError, (W, M, "lacks slots")),
    ("missing-module-tensors", edit_tensors(lambda t: [t.pop(f"{M}.{f}") for f in ("P", "lam", "Q", "slots")]),
     ValueError, (R, M, "holds no tensors")),
    ("extra-module-tensors", edit_tensors(lambda t: t.update({
        f"x.{f}": t[f"{M}.{f}"].clone() for f in ("P", "lam", "Q", "slots")})), ValueError, (W, "'x'", R)),
    ("extra-stray-tensor", edit_tensors(lambda t: t.update({"stray": torch.zeros(2)})), ValueError, (W, "'stray'")),
    ("empty-weights-file", edit_tensors(lambda t: t.clear()), ValueError, (W, "holds no tensors")),
    # --- JSON of the wrong types: flexlora_config.json
    ("config-is-a-list", write_text(C, "[1, 2]"), ValueError, (C, "JSON object")),
    ("config-deeply-nested", write_text(C, "[" * 100_000 + "]" * 100_000), ValueError, (C, "JSON")),
    ("config-not-utf8", lambda f: (f / C).write_bytes(b'{"r": "\xff\xfe"}'), ValueError, (C, "JSON")),
    ("capacity-missing", config_field("_capacity", None), ValueError, (C, "_capacity")),
    ("capacity-a-list", config_field("_capacity", [7] * 14), ValueError, (C, "_capacity")),
    ("capacity-string", capacity_of("7"), ValueError, (C, M, "integer")),
    ("capacity-megabyte-string", capacity_of("7" * 2**20), ValueError, (C, M, "integer")),
    ("capacity-float", capacity_of(7.0), ValueError, (C, M, "integer")),
    ("capacity-bool", capacity_of(True), ValueError, (C, M, "integer")),
    ("capacity-null", capacity_of(None), ValueError, (C, M, "integer")),
    ("capacity-nan", capacity_of(math.nan), ValueError, (C, M, "integer")),
    ("capacity-entry-missing", edit_json(C, lambda d: d["_capacity"].pop(M)), ValueError, (C, M, "_capacity")),
    ("capacity-unknown-module", capacity_of(7, "model.layers.9.mlp.up_proj"), ValueError, (C, "layers.9")),
    ("capacity-final-string", config_field("_capacity_final", "yes"), ValueError, (C, "_capacity_final")),
    ("base-model-name-number", config_field("_base_model_name_or_path", 5), ValueError, (C, "_base_model")),
    ("slot-birth-a-list", config_field("_slot_birth", [1, 2]), ValueError, (C, "_slot_birth")),
    ("slot-birth-module-a-list", slot_birth([30]), ValueError, (C, M, "_slot_birth")),
    ("slot-birth-unknown-module", slot_birth({"0": 1}, "nope"), ValueError, (C, "'nope'")),
    ("slot-birth-slot-word", slot_birth({"four": 30}), ValueError, (C, M, "slot number")),
    ("slot-birth-step-string", slot_birth({"4": "30"}), ValueError, (C, M, "integer")),
    ("slot-birth-step-float", slot_birth({"4": 30.5}), ValueError, (C, M, "integer")),
    ("r-string", config_field("r", "4"), ValueError, (C, "FlexLoRAConfig.r")),
    ("r-float", config_field("r", 4.0), ValueError, (C, "Write r=4")),
    ("delta_t-float", config_field("delta_t", 10.5), ValueError, (C, "delta_t=10.5 must be an integer number")),
    ("b0-bool", config_field("b0", True), ValueError, (C, "FlexLoRAConfig.b0")),
    ("total_steps-negative", config_field("total_steps", -100), ValueError, (C, "total_steps")),
    ("t_warmup-null", config_field("t_warmup", None), ValueError, (C, "t_warmup")),
    ("lora_alpha-string", config_field("lora_alpha", "8"), ValueError, (C, "lora_alpha")),
    ("lora_alpha-infinite", config_field("lora_alpha", math.inf), ValueError, (C, "lora_alpha")),
    ("target_modules-number", config_field("target_modules", 5), ValueError, (C, "target_modules")),
    ("importance-list", config_field("importance", ["entropy"]), ValueError, (C, "importance")),
    ("unknown-field", config_field("rank", 4), ValueError, (C, "rank")),
    ("max_rank-unknown-key", config_field("max_rank", {"q_proj": 8}), ValueError, (C, "'q_proj'", M)),
    ("max_rank-float-cap", config_field("max_rank", {M: 8.5}), ValueError, (C, "max_rank")),
    ("max_rank-string", config_field("max_rank", "8"), ValueError, (C, "max_rank")),
    # --- JSON of the wrong types: rank_map.json and rank_history.json
    ("rank-map-a-list", write_text(R, "[5]"), ValueError, (R, "JSON object")),
    ("rank-map-empty", write_text(R, "{}"), ValueError, (R, "non-empty")),
    ("rank-map-string-rank", edit_json(R, lambda d: d.__setitem__(M, "5")), ValueError, (R, M, "integer")),
    ("rank-map-float-rank", edit_json(R, lambda d: d.__setitem__(M, 5.0)), ValueError, (R, M, "integer")),
    ("rank-map-bool-rank", edit_json(R, lambda d: d.__setitem__(M, True)), ValueError, (R, M, "integer")),
    ("rank-map-null-rank", edit_json(R, lambda d: d.__setitem__(M, None)), ValueError, (R, M, "integer")),
    ("rank-map-huge-digits", write_text(R, f'{{"{M}": {"9" * 5000}}}'), ValueError, (R, "JSON")),
    ("rank-map-unknown-module", edit_json(R, lambda d: d.__setitem__("nope.q", 4)), ValueError, (R, "nope.q")),
    ("rank-map-missing-module", edit_json(R, lambda d: d.pop(M)), ValueError, (W, R, M)),
    ("history-a-dict", write_text(H, '{"step": 1}'), ValueError, (H, "list")),
    ("history-record-string", history_record("event"), ValueError, (H, "record 0")),
    ("history-record-list", history_record([1, 2]), ValueError, (H, "record 0")),
    ("history-step-string", history_record({"step": "20"}), ValueError, (H, "record 0", "step")),
    ("history-step-float", history_record({"step": 20.5}), ValueError, (H, "record 0", "step")),
    ("history-ranks-list", history_record({"step": 20, "ranks": [4, 4]}), ValueError, (H, "record 0", "ranks")),
    ("history-ranks-string", history_record({"step": 20, "ranks": {M: "4"}}), ValueError, (H, M)),
    ("history-prune-string", history_record({"step": 20, "prune": M}), ValueError, (H, "record 0", "prune")),
    ("history-expand-numbers", history_record({"step": 20, "expand": [1]}), ValueError, (H, "record 0", "expand")),
    ("history-scores-strings", history_record({"step": 20, "scores": {M: "x"}}), ValueError, (H, "scores")),
    ("history-budget-bool", history_record({"step": 20, "budget": True}), ValueError, (H, "budget")),
    # --- NaN / inf values (refused, see flexlora_hf/io/validation.py)
    ("P-nan", set_tensor(f"{M}.P", nan_at(math.nan)), ValueError, (W, M, "non-finite", "in P")),
    ("lam-inf", set_tensor(f"{M}.lam", nan_at(math.inf)), ValueError, (W, M, "non-finite", "in lam")),
    ("Q-minus-inf", set_tensor(f"{M}.Q", nan_at(-math.inf)), ValueError, (W, M, "non-finite", "in Q")),
    ("lam-nan-bf16", set_tensor(f"{M}.lam", lambda v: nan_at(math.nan)(v).bfloat16()), ValueError, (W, M, "NaN")),
    # --- a BERT classifier: modules_to_save weights
    ("bert-head-nan", set_tensor("modules_to_save.classifier.weight", nan_at(math.nan)), ValueError,
     (W, "classifier.weight", "non-finite")),
    ("bert-head-inf-bias", set_tensor("modules_to_save.classifier.bias", nan_at(math.inf)), ValueError,
     (W, "classifier.bias", "non-finite")),
    ("bert-head-int", set_tensor("modules_to_save.classifier.weight", lambda w: w.to(torch.int32)), ValueError,
     (W, "classifier.weight", "dtype")),
    ("bert-head-shape", set_tensor("modules_to_save.classifier.weight", lambda w: torch.zeros(5, 32)), ValueError,
     ("classifier.weight", "shape mismatch")),
    ("bert-head-unknown-param", edit_tensors(lambda t: t.update({"modules_to_save.head.weight": torch.zeros(2)})),
     ValueError, (W, "'head.weight'")),
]
assert len(CASES) == 171, len(CASES)  # the module docstring states the count
assert len({case[0] for case in CASES}) == len(CASES), "case ids must be unique"


# ------------------------------------------------------------------------------------------------------ machinery
@contextlib.contextmanager
def address_space_ceiling(extra: int) -> Iterator[None]:
    """Cap the process's address space at its current size + `extra` bytes (Linux; elsewhere no cap).

    torch allocates CPU tensors outside Python's allocator (tracemalloc never sees them), and a zeroed (d_out x 10^9)
    tensor would be far above this ceiling: the allocation fails with a RuntimeError, which no case accepts.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    limit = current + extra if hard == resource.RLIM_INFINITY else min(current + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind, make in (("llama", tiny_llama), ("bert", tiny_bert)):
        fm = trained(make)
        path = tmp_path_factory.mktemp(kind) / "adapter"
        fm.save_pretrained(path)
        out[kind] = path
    rank_map = json.loads((out["llama"] / R).read_text())
    births = json.loads((out["llama"] / C).read_text())["_slot_birth"]
    assert rank_map[M] == 5 and births[M] == {"4": 30}, "the cases assume this module's rank and young slot"
    return out


def damaged_copy(source: Path, target: Path, damage: Damage) -> Path:
    target.mkdir()
    for name in NATIVE:
        (target / name).write_bytes((source / name).read_bytes())
    damage(target)
    return target


def test_the_ceiling_is_real() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS is only relied on under Linux")
    with address_space_ceiling(CEILING), pytest.raises(RuntimeError):
        torch.zeros(32, 10**8)  # 12.8 GB: what a trusted capacity of 10^8 would allocate for one P


@pytest.mark.parametrize(("damage", "error", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_folder_is_refused(
    saved: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest, damage: Damage, error: type, named: tuple
) -> None:
    kind = "bert" if request.node.callspec.id.startswith("bert-") else "llama"
    folder = damaged_copy(saved[kind], tmp_path / "adapter", damage)
    base = tiny_bert() if kind == "bert" else tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    start = time.perf_counter()
    with address_space_ceiling(CEILING), pytest.raises(error) as caught:
        load_flexlora(base, folder, is_trainable=True)  # the path that rebuilds the saved slot capacities
    assert time.perf_counter() - start < 2.0
    message = str(caught.value)
    for part in named:
        assert part in message, f"{part!r} missing from: {message}"
    assert len(message) < 2000, "a hostile value must not blow up the message"
    # Refused before anything was modified: the base model is exactly as it was.
    assert not any(isinstance(m, FlexLoRALayer) for m in base.modules())
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "case", ["capacity-1e9", "slots-1e9", "slot-birth-slot-at-rank", "lam-inf", "header-P-transposed", "bert-head-nan"]
)
def test_load_adapter_into_refuses_without_touching_the_model(saved: dict[str, Path], tmp_path: Path, case: str) -> None:
    # Resume path: the adapted model keeps every tensor, capacity and its history when the checkpoint is damaged.
    damage, error, named = next(c[1:] for c in CASES if c[0] == case)
    kind = "bert" if case.startswith("bert-") else "llama"
    model = trained(tiny_bert if kind == "bert" else tiny_llama, events=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranks, caps, history = model.rank_map(), model.rank_caps(), list(model.rank_history)
    folder = damaged_copy(saved[kind], tmp_path / "adapter", damage)
    with address_space_ceiling(CEILING), pytest.raises(error, match=named[0].replace(".", r"\.")):
        load_adapter_into(model, folder)
    assert model.rank_map() == ranks and model.rank_caps() == caps and model.rank_history == history
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_undamaged_copy_still_loads(saved: dict[str, Path], tmp_path: Path) -> None:
    # The fuzz's copies are faithful: without damage the folder loads under the same ceiling.
    folder = damaged_copy(saved["llama"], tmp_path / "adapter", lambda f: None)
    with address_space_ceiling(CEILING):
        model = load_flexlora(tiny_llama(), folder, is_trainable=True)
    assert model.rank_map()[M] == 5 and model.rank_caps()[M] == 7
    assert dict(model.flexlora_layers())[M].slot_birth == {4: 30}
