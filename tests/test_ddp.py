"""A real 2-process CPU run under torchrun (gloo): every process must end with the same ranks and adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import torchrun
from safetensors.torch import load_file


def _torchrun(tmp_path, *extra: str) -> list[dict]:
    torchrun(Path(__file__).parent / "ddp_train.py", str(tmp_path), *extra)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_processes_apply_process_zeros_plan_even_when_they_disagree(tmp_path):
    meta = _torchrun(tmp_path, "disagree")
    local = meta[1]["local_plan"]  # what process 1 would have done from its own (perturbed) numbers
    applied = next(e for e in meta[1]["history"] if e["step"] == 4)
    assert local is not None and (local["prune"], local["expand"]) != (applied["prune"], applied["expand"])
    assert meta[0]["history"] == meta[1]["history"]  # both applied process 0's plan
    assert meta[0]["ranks"] == meta[1]["ranks"]


def test_two_process_run_agrees_across_ranks(tmp_path):
    meta = _torchrun(tmp_path)
    assert meta[0]["world"] == meta[1]["world"] == 2
    assert meta[0]["events"] == meta[1]["events"] == 3
    assert meta[0]["ddp"] == "DistributedDataParallel"
    assert meta[0]["find_unused_parameters"] is False  # set before the accelerator was built
    assert meta[0]["ranks"] == meta[1]["ranks"]
    assert meta[0]["ranks"] != {n: 4 for n in meta[0]["ranks"]}
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
