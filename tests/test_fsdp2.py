"""FSDP2 (`fully_shard`) in a custom loop, 2 CPU processes under torchrun (gloo): events, resets, eq. 2, slot-age
correction, save and an interrupted-and-resumed run all match an unsharded reference to rounding (float64).

The Trainer cannot drive FSDP on CPU (accelerate falls back to DDP there), so the custom-loop API is what is tested;
`FlexLoRATrainer` refuses FSDP (tests/test_trainer_robustness.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, torchrun
from safetensors.torch import load_file

TOL = 1e-12  # float64 rounding of a different reduction order is ~1e-16


def _torchrun(tmp_path, mode: str) -> list[dict]:
    torchrun(Path(__file__).parent / "fsdp2_train.py", str(tmp_path), mode)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check_same_run(meta: list[dict]) -> None:
    for m in meta:
        assert m["world"] == 2
        assert m["placements"] == ["S(0)"]  # λ and Q sharded along the slot dimension
        assert m["events"] == m["ref_events"]  # the same decisions as the unsharded run
        assert any(e["prune"] for e in m["events"])  # decisions were taken
        worst = max(m["diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, worst  # P, λ, Q and both AdamW moments of every slot
    assert meta[0]["events"] == meta[1]["events"]


def _check_matches_reference(meta: list[dict]) -> None:
    _check_same_run(meta)
    assert (meta[0]["local_slots"], meta[1]["local_slots"]) == (3, 2)  # 5 slots: uneven shards
    # Some event pruned a module using slots of process 1's shard (rank above the slots process 0 holds), so a
    # direction (and its moments) moved from one process's shard into the other's, or was removed there.
    local, events = meta[0]["local_slots"], meta[0]["events"]
    before = [{n: 2 for n in events[0]["ranks"]}] + [e["ranks"] for e in events[:-1]]  # r = 2 at start
    assert any(before[i][n] > local for i, e in enumerate(events) for n in e["prune"])


def test_fsdp2_custom_loop_matches_unsharded_reference(tmp_path):
    meta = _torchrun(tmp_path, "plain")
    _check_matches_reference(meta)
    for m in meta:
        assert m["orth_in_forward"] is True  # eq. 2 taken inside the forward, where P and Q are whole
        assert m["orth"] == pytest.approx(m["ref_orth"], rel=1e-10, abs=1e-14)
        assert max(m["ref_orth"]) > 0  # the term is live (not 0 from the orthonormal init only)
    # Every process called save_pretrained; process 0 wrote the gathered adapter, equal to the reference's.
    got = load_file(str(tmp_path / "fsdp" / "flexlora_adapter.safetensors"))
    want = load_file(str(tmp_path / "ref" / "flexlora_adapter.safetensors"))
    assert got.keys() == want.keys()
    assert any("lm_head" in key for key in want)  # modules_to_save (sharded too) gathered for the save
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert torch.allclose(got[key], want[key], atol=TOL, rtol=0), key
    assert json.loads((tmp_path / "fsdp" / "rank_map.json").read_text()) == meta[0]["events"][-1]["ranks"]


def test_fsdp2_interrupted_run_resumes_exactly(tmp_path):
    """Saved at step 7 (adapter folder on process 0 + DCP optimizer state on both), rebuilt from scratch, resumed:
    the final adapter and moments equal those of the uninterrupted reference."""
    meta = _torchrun(tmp_path, "resume")
    _check_matches_reference(meta)


def test_fsdp2_lora_like_basis_matches_unsharded_reference(tmp_path):
    """init_basis='lora_like' prunes by |λ|·||p||·||q||: the norms reduce over P's and Q's shards (DTensor)."""
    meta = _torchrun(tmp_path, "lora_like")
    _check_same_run(meta)
    for m in meta:
        assert m["orth"] == pytest.approx(m["ref_orth"], rel=1e-10, abs=1e-14)


def test_example_loop_runs_under_fsdp2(tmp_path):
    """examples/accelerate_loop.py --fsdp2 under torchrun (2 CPU processes) on a tiny Llama with MiniLM's tokenizer:
    trains through events and saves one adapter folder (process 0 writes the gathered adapter)."""
    from transformers import AutoTokenizer

    from flexlora_hf.data.assets import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(f"line {i} of a small corpus for the loop, with words {i * 7}" for i in range(64)))
    out = tmp_path / "adapter"
    script = Path(__file__).resolve().parents[1] / "examples" / "accelerate_loop.py"
    args = ["--fsdp2", "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--max_steps", "10", "--batch_size", "2", "--block_size", "16", "--lora_r", "2", "--target_modules", "q_proj,v_proj"]
    torchrun(script, *args)
    history = json.loads((out / "rank_history.json").read_text())
    events = history["events"] if isinstance(history, dict) else history
    assert events and any(e["prune"] for e in events)
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert sum(rank_map.values()) == 2 * len(rank_map)  # the global budget is conserved
    assert load_file(str(out / "adapter_model.safetensors"))  # the plain PEFT view was written too
