"""End-to-end tests of `examples/run_image_classification.py` (ViT + FlexLoRA, the paper's VTAB-1k setting).

No real pretrained vision model can be installed offline here (PyPI only, no Hub), so the model is a tiny random ViT
built from a `ViTConfig` and saved as an ordinary model folder with its `ViTImageProcessor`, and the images are
scikit-learn's 8x8 handwritten digits (upsampled by the image processor), written to disk in the VTAB-1k layout
(list files + images) and as class folders. The scripts' ``main(argv)`` runs in-process; the saved adapter must
load in stock PEFT on the same ViT and give the same logits, and the VTAB recipe must parse into the paper's values.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import ADAPTER_FILES, EXAMPLES, load_example

SCHEDULE = ["--r", "4", "--lora_alpha", "8", "--b0", "2", "--t_warmup", "4", "--t_final", "4", "--delta_t", "3"]
COMMON = [
    "--do_train", "--do_eval", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
    "--learning_rate", "5e-3", "--max_steps", "20", "--warmup_steps", "0", "--report_to", "none",
    "--save_strategy", "no", "--logging_steps", "5", "--seed", "0", "--dataloader_num_workers", "0", "--use_cpu",
    "--disable_tqdm", "true",
]  # fmt: skip


def load_script() -> ModuleType:
    return load_example("run_image_classification")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT image classifier (32x32 inputs, 8x8 patches, 2 blocks) and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit") / "tiny-vit"
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _digit_images(n: int) -> list[tuple[np.ndarray, int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return [((digits.images[i] * 255 / 16).astype(np.uint8), int(digits.target[i])) for i in range(n)]


@pytest.fixture(scope="module")
def vtab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VTAB-1k-shaped task folder ("svhn": 10 classes) holding 240 digits: images/ plus the four list files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vtab-1k") / "svhn"
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (pixels, label) in enumerate(_digit_images(240)):
        Image.fromarray(pixels).save(root / "images" / f"{i:04d}.png")
        lines.append(f"images/{i:04d}.png {label}")
    (root / "train800.txt").write_text("\n".join(lines[:160]) + "\n")
    (root / "val200.txt").write_text("\n".join(lines[160:200]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines[:200]) + "\n")
    (root / "test.txt").write_text("\n".join(lines[200:]) + "\n")
    return root


def _logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def _validation_pixels(vit_dir: Path, vtab_dir: Path) -> tuple[torch.Tensor, np.ndarray]:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(vit_dir)
    rows = [line.rsplit(" ", 1) for line in (vtab_dir / "test.txt").read_text().splitlines()]
    images = [Image.open(vtab_dir / path).convert("RGB") for path, _ in rows]
    return processor(images, return_tensors="pt")["pixel_values"], np.array([int(label) for _, label in rows])


def test_vit_on_a_vtab1k_folder_end_to_end(vit_dir: Path, vtab_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import ViTForImageClassification

    from flexlora_hf import FlexLoRAModel

    script = load_script()
    out = tmp_path / "out"
    metrics = script.main(
        ["--model_name_or_path", str(vit_dir), "--vtab1k_dir", str(vtab_dir), "--output_dir", str(out)]
        + COMMON
        + SCHEDULE
    )
    for name in ADAPTER_FILES:
        assert (out / name).is_file(), name
    rank_map = json.loads((out / "rank_map.json").read_text())
    # Exactly the paper's six ViT matrices per block (this transformers' names), nothing else.
    kinds = {name.split(".", 3)[-1] for name in rank_map}
    assert kinds == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"} or kinds == {
        "attention.attention.query", "attention.attention.key", "attention.attention.value",
        "attention.output.dense", "intermediate.dense", "output.dense",
    }  # fmt: skip
    assert len(rank_map) == 12 and sum(rank_map.values()) == 4 * 12
    assert json.loads((out / "rank_history.json").read_text()), "no reallocation event happened"
    flex_cfg = json.loads((out / "flexlora_config.json").read_text())
    assert flex_cfg["modules_to_save"] == ["classifier"]  # the default head of *ForImageClassification
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])

    pixels, labels = _validation_pixels(vit_dir, vtab_dir)
    flex = FlexLoRAModel.from_pretrained(ViTForImageClassification.from_pretrained(vit_dir), out)
    peft_model = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(vit_dir), out).eval()
    expected = _logits(flex, pixels)
    torch.testing.assert_close(_logits(peft_model, pixels), expected, rtol=1e-5, atol=1e-5)
    # The head was trained: the adapter is not the base model.
    assert not torch.allclose(_logits(ViTForImageClassification.from_pretrained(vit_dir).eval(), pixels), expected)
    # The Trainer's reported accuracy is that of the saved adapter on the test list.
    assert float((expected.argmax(-1).numpy() == labels).mean()) == pytest.approx(metrics["eval_accuracy"])


def test_vit_on_image_folders_with_a_held_out_split(vit_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    train = tmp_path / "train"
    for i, (pixels, label) in enumerate(_digit_images(120)):
        (train / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(train / str(label) / f"{i}.png")
    script = load_script()
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(vit_dir), "--train_dir", str(train), "--train_val_split", "0.25"]
    argv += ["--output_dir", str(out), "--target_modules", "q_proj,v_proj" if _refactored(vit_dir) else "query,value"]
    metrics = script.main(argv + COMMON + SCHEDULE + ["--max_steps", "12"])  # the last flag wins
    n_held_out = 30  # 25 % of 120 images
    assert metrics["eval_accuracy"] * n_held_out == pytest.approx(round(metrics["eval_accuracy"] * n_held_out))
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert len(rank_map) == 4  # q and v of 2 blocks: --target_modules is honoured


def _refactored(vit_dir: Path) -> bool:
    from transformers import ViTForImageClassification

    return any(n.endswith("q_proj") for n, _ in ViTForImageClassification.from_pretrained(vit_dir).named_modules())


def test_bad_data_arguments_are_refused(vit_dir: Path, vtab_dir: Path, tmp_path: Path) -> None:
    script = load_script()
    base = ["--model_name_or_path", str(vit_dir), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="Need --vtab1k_dir, --dataset_name or --train_dir"):
        script.parse_args(base)
    with pytest.raises(ValueError, match="only one data source"):
        script.parse_args([*base, "--vtab1k_dir", str(vtab_dir), "--train_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--vtab1k_protocol must be one of"):
        script.parse_args([*base, "--vtab1k_dir", str(vtab_dir), "--vtab1k_protocol", "train"])
    with pytest.raises(FileNotFoundError, match="train800val200.txt is missing"):
        script.load_vtab1k(str(tmp_path))
    tuning = script.load_vtab1k(str(vtab_dir), "tuning")
    assert (len(tuning["train"]), len(tuning["validation"])) == (160, 40)
    assert tuning["train"].features["label"].num_classes == 10


def test_vtab_recipe_has_the_papers_settings(tmp_path: Path) -> None:
    """The recipe's command line parses through the script's parser into the paper's VTAB-1k values."""
    script = load_script()
    argv_file = tmp_path / "argv.txt"
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\nshift\nprintf "%s\\n" "$@" > {argv_file}\n')  # drop the script path
    shim.chmod(0o755)
    subprocess.run(
        ["bash", str(EXAMPLES / "vtab" / "run_vtab1k.sh"), "dtd", "--seed", "3"],
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(shim), "VTAB1K_ROOT": "/data/vtab-1k"},
    )
    model_args, data_args, training_args, flexlora_args = script.parse_args(argv_file.read_text().splitlines())
    config = flexlora_args.to_flexlora_config(seed=training_args.seed)
    assert training_args.learning_rate == pytest.approx(2e-3) and training_args.weight_decay == pytest.approx(1e-3)
    assert data_args.vtab1k_dir == "/data/vtab-1k/dtd" and data_args.vtab1k_protocol == "final"
    assert model_args.model_name_or_path == "google/vit-base-patch16-224-in21k"
    assert config.modules_to_save == ["classifier"] and config.target_modules is None  # -> the six ViT matrices
    assert (config.r, config.lora_alpha, config.b0) == (8, 16, 4)
    assert training_args.seed == 3 and config.seed == 3  # extra arguments override the defaults
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            ["bash", str(EXAMPLES / "vtab" / "run_vtab1k.sh"), "imagenet"],
            check=True,
            env={"PATH": "/usr/bin:/bin", "PYTHON": str(shim)},
            capture_output=True,
        )
    recipe_tasks = re.search(r'^VTAB1K_TASKS="(.*)"$', (EXAMPLES / "vtab" / "run_vtab1k.sh").read_text(), re.M)
    assert recipe_tasks is not None and set(recipe_tasks.group(1).split()) == set(script.VTAB1K_NUM_CLASSES)
    assert len(script.VTAB1K_NUM_CLASSES) == 19
