"""A real 2-process CPU run under torchrun (gloo): every process must end with the same ranks and adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def test_two_process_run_agrees_across_ranks(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert meta[0]["world"] == meta[1]["world"] == 2
    assert meta[0]["events"] == meta[1]["events"] == 3
    assert meta[0]["ranks"] == meta[1]["ranks"]
    assert meta[0]["ranks"] != {n: 4 for n in meta[0]["ranks"]}
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
