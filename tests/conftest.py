"""Fixtures shared by the test modules. Where shared code lives in this test suite:

* `conftest.py` (this file): fixtures used by more than one test module; pytest provides them by name, nothing
  imports them. `local_hub` (defined in `hub_stub.py`, registered here): a running loopback `LocalHub` with
  `huggingface_hub`, `transformers` and PEFT pointed at it.
* `helpers.py`: plain functions, imported explicitly (``from helpers import tiny_llama, training_args``): the tiny
  random models built from configs (`tiny_llama`, `tiny_bert`, `tiny_gpt2`, one builder per architecture whose
  keyword arguments cover every variant the tests use; `trainer_llama` / `trainer_bert` for the Trainer tests),
  the synthetic datasets (`lm_dataset`, `cls_dataset`), `training_args`, and adapter helpers (`trained`, `logits`,
  ...). Builders are plain functions rather than fixtures because `ddp_train.py`, run as a script by torchrun, needs
  them too, and because tests pass them around as values (`parametrize("make", [tiny_llama, tiny_bert])`).
* `hub_stub.py` (the loopback Hub) and `reference_impl.py` (plain-Python reference formulas): plain helper modules.

No test module (``test_*.py``) imports another one. Markers (pyproject.toml): `slow`, deselected by default
(``pytest -m slow`` runs them).
"""

from __future__ import annotations

import logging

import pytest
import transformers
from hub_stub import local_hub_fixture  # noqa: F401 - registers the `local_hub` fixture for every test module


@pytest.fixture(autouse=True)
def _restore_logging():
    """Example scripts configure transformers' and flexlora_hf's logging globally; put it back after each test."""
    verbosity = transformers.utils.logging.get_verbosity()
    level = logging.getLogger("flexlora_hf").level
    yield
    transformers.utils.logging.set_verbosity(verbosity)
    logging.getLogger("flexlora_hf").setLevel(level)
