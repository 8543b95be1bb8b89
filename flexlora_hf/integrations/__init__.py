"""Third-party trainer integrations: FlexLoRA inside trainers that are not `transformers.Trainer` itself.

Each submodule imports its third-party library at import time, so nothing here is imported by `import flexlora_hf`:

* `flexlora_hf.integrations.trl`: [`FlexLoRASFTTrainer`], TRL's `SFTTrainer` with FlexLoRA adapters
  (``pip install flexlora_hf[trl]``; also exported lazily as ``flexlora_hf.FlexLoRASFTTrainer``).
"""
