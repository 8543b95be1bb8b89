"""Benchmarks for flexlora_hf: training cost, reallocation-event cost, inference cost and quality.

The studies behind the current figures are spec files, ``benchmarks/studies/<study>.toml``, run by
``python -m benchmarks.run <study>`` (``--list`` names them, ``--report`` re-renders every report and the generated
docs blocks; `benchmarks.run`). Each harness also runs as a module from the repository root, e.g.
``python -m benchmarks.cost --model tiny``; see ``docs/benchmarks.md`` for the commands, the machine and the numbers.

* `benchmarks.cost`: training step time and peak memory of FlexLoRA vs PEFT LoRA vs PEFT AdaLoRA.
* `benchmarks.event_cost`: one reallocation event at LLaMA3-8B adapter shapes.
* `benchmarks.inference`: merged / unmerged forward time.
* `benchmarks.quality`: MiniLM-L6 on three BIG-bench classification tasks, plus the paper's ablations.
* `benchmarks.decoder_check`: SmolLM2-135M (4-bit) with the commonsense recipe, FlexLoRA vs PEFT LoRA, lm-eval.
* `benchmarks.docs_report`: renders the generated blocks of README.md and docs/benchmarks.md from the records.
"""
