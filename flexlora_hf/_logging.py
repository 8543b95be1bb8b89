"""Keeps one useless third-party log line out of our users' output (and nothing else).

On CPUs with AVX512-BF16, importing bitsandbytes 0.50 (which `import peft` and transformers' `Trainer` do) logs
"Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels". The advice does not apply:
`kernels` downloads code from the Hub at run time (impossible offline), and FlexLoRA's CPU guard
(`quantization.guard_bnb_cpu`) keeps 4-bit layers off that kernel anyway. We drop exactly that record with a filter
on bitsandbytes' CPU-ops logger; every other bitsandbytes message passes. Set `FLEXLORA_HF_SHOW_BNB_HINT=1` to see it.
"""

from __future__ import annotations

import logging
import os

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


def silence_bitsandbytes_kernels_hint() -> None:
    """Install the filter once (idempotent; touches only the logger's filter list, never imports bitsandbytes)."""
    if os.environ.get("FLEXLORA_HF_SHOW_BNB_HINT"):
        return
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsHint) for f in logger.filters):
        logger.addFilter(_DropKernelsHint())
