#!/usr/bin/env python
"""FlexLoRA in your own training loop (accelerate or plain PyTorch), without `transformers.Trainer`.

The three lines a custom loop needs, in PEFT AdaLoRA's vocabulary, are marked ``# FlexLoRA:``:

1. wrap the model: ``model = get_flexlora_model(base, FlexLoRAConfig(..., total_steps=T))`` (``total_steps`` fixes
   the schedule and the per-module rank caps before the optimizer is built);
2. add the orthogonality term of eq. 2 to the loss: ``loss = task_loss + γ · model.orth_reg()`` (the Trainer does
   this in ``compute_loss``; divide it like the task loss under gradient accumulation);
3. after every ``optimizer.step()``: ``model.update_and_allocate(global_step, optimizer)`` with the 1-based count of
   optimizer steps; it runs the scheduled reallocation event (or nothing) exactly as ``FlexLoRACallback`` does,
   resetting the optimizer moments of the touched directions in place.

Build the optimizer from ``flexlora_hf.optim.surgery.param_groups``: λ gets its own group (never weight decay), as
``FlexLoRATrainer`` does.

Example (offline, real model; a text file with one document per line)::

    accelerate launch examples/accelerate_loop.py --model_name_or_path "$(python -m flexlora_hf.data.assets smollm2)" \\
        --train_file my_corpus.txt --max_steps 40 --output_dir outputs/loop_smollm2

FSDP2 (``fully_shard``): the same loop, launched with torchrun and ``--fsdp2``; every decoder block and the model are
sharded, each process trains on its rows of every batch, and every process calls ``save_pretrained`` (the adapter
is gathered; process 0 writes). Nothing else changes: events gather the touched layers, eq. 2 is taken inside the
forward (``flexlora_hf/distributed/sharding.py``)::

    torchrun --nproc_per_node 2 examples/accelerate_loop.py --fsdp2 --model_name_or_path ... --train_file ... \\
        --output_dir outputs/loop_fsdp2

A test (tests/test_accelerate_loop.py) checks that this loop and the Trainer make the same rank decisions;
tests/test_fsdp2.py that the FSDP2 loop matches an unsharded run, resume included.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from flexlora_hf import FlexLoRAConfig, FlexLoRAModel, get_flexlora_model
from flexlora_hf.optim.surgery import param_groups

logger = logging.getLogger("accelerate_loop")


def train_loop(
    model: FlexLoRAModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    max_steps: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    accelerator: Any = None,
) -> FlexLoRAModel:
    """Train `model` for `max_steps` optimizer steps on `batches` (cycled) with AdamW and a constant rate.

    Args:
        model (`FlexLoRAModel`): from `get_flexlora_model` with `total_steps` set (or `finalize_capacity` called).
        batches (iterable of `dict`): model inputs with `labels`; re-iterated when exhausted.
        max_steps (`int`): optimizer steps.
        learning_rate (`float`), weight_decay (`float`): AdamW settings.
        accelerator (`accelerate.Accelerator`, *optional*): prepares model and optimizer and runs backward.

    Returns:
        `FlexLoRAModel`: the trained model (unwrapped), its `rank_history` holding every event.
    """
    flex = model
    gamma = flex.flexlora_config.orth_reg_weight
    # FlexLoRA: λ in its own group without weight decay, as FlexLoRATrainer does
    groups = param_groups(flex, learning_rate, weight_decay)
    optimizer: Any = torch.optim.AdamW(groups, lr=learning_rate)
    train_model: nn.Module = flex
    if accelerator is not None:
        train_model, optimizer = accelerator.prepare(flex, optimizer)
    train_model.train()
    data = _cycle(batches)
    for step in range(1, max_steps + 1):
        batch = next(data)
        loss = train_model(**batch).loss
        if gamma > 0:
            loss = loss + gamma * flex.orth_reg()  # FlexLoRA: eq. 2
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = flex.update_and_allocate(step, optimizer)  # FlexLoRA: the scheduled event, or nothing
        if record is not None:
            logger.info("step %d: event, total rank %d", step, sum(record["ranks"].values()))
    return flex


def _cycle(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from batches


def main(argv: list[str] | None = None) -> FlexLoRAModel:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--train_file", required=True, help="A .txt file, one document per line.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--lora_r", "--r", dest="r", type=int, default=8, help="Initial rank (--lora_r under torchrun, which takes --r for its own).")
    parser.add_argument("--target_modules", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    parser.add_argument("--fsdp2", action="store_true", help="Shard with FSDP2 fully_shard (launch with torchrun).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    accelerator = None if args.fsdp2 else Accelerator()
    device = _init_fsdp2() if args.fsdp2 else accelerator.device  # type: ignore[union-attr]
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    with open(args.train_file, encoding="utf-8") as f:
        ids = tokenizer("\n".join(line.strip() for line in f if line.strip()))["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // args.block_size * args.block_size]).view(-1, args.block_size)
    if len(blocks) == 0:
        raise ValueError(f"{args.train_file} holds fewer than --block_size={args.block_size} tokens.")
    if args.fsdp2:  # each process takes its rows of every global batch (FSDP averages the gradients)
        import torch.distributed as dist

        blocks = blocks[dist.get_rank() :: dist.get_world_size()]
    batches = [{"input_ids": b.to(device), "labels": b.to(device)} for b in blocks.split(args.batch_size)]
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    third = max(1, args.max_steps // 5)
    config = FlexLoRAConfig(  # FlexLoRA: the adapter and its schedule, with the run's length
        r=args.r,
        target_modules=args.target_modules.split(","),
        t_warmup=third,
        t_final=third,
        delta_t=max(1, third // 2),
        total_steps=args.max_steps,
    )
    model = get_flexlora_model(base, config)
    if args.fsdp2:
        shard_fsdp2(model.to(device))  # after total_steps fixed the slots, before the optimizer is built
    model = train_loop(
        model, batches, max_steps=args.max_steps, learning_rate=args.learning_rate, accelerator=accelerator
    )
    if args.fsdp2 or accelerator.is_main_process:  # type: ignore[union-attr]
        model.save_pretrained(args.output_dir)  # FSDP2: on every process (a gather); process 0 writes
        logger.info("Saved the adapter (total rank %d) to %s", model.total_rank(), args.output_dir)
    return model


def _init_fsdp2() -> torch.device:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_fsdp2(model: FlexLoRAModel) -> FlexLoRAModel:
    """`fully_shard` every block transformers would not split (`_no_split_modules`, e.g. LlamaDecoderLayer), then
    the whole model, as accelerate's FSDP2 auto-wrap does."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)
    return model


if __name__ == "__main__":
    main()
