"""Entropy-guided FlexLoRA for the Hugging Face stack."""
