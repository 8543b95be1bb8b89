"""Benchmarks for flexlora_hf: training cost, reallocation-event cost, inference cost and quality.

Run each as a module from the repository root, e.g. ``python -m benchmarks.cost --model tiny``; see
``docs/benchmarks.md`` for the commands, the machine and the numbers.

* `benchmarks.cost`: training step time and peak memory of FlexLoRA vs PEFT LoRA vs PEFT AdaLoRA.
* `benchmarks.event_cost`: one reallocation event at LLaMA3-8B adapter shapes.
* `benchmarks.inference`: merged / unmerged forward time.
* `benchmarks.quality`: MiniLM-L6 on three BIG-bench classification tasks, plus the paper's ablations.
* `benchmarks.decoder_check`: SmolLM2-135M (4-bit) with the commonsense recipe, FlexLoRA vs PEFT LoRA, lm-eval.
"""
