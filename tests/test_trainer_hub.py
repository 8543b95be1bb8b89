"""FlexLoRATrainer.push_to_hub against the loopback Hub stand-in: our card, not transformers' generic one."""

from __future__ import annotations

import torch
import yaml
from helpers import cls_dataset, trainer_bert, training_args
from hub_stub import LocalHub
from huggingface_hub import model_info
from peft import PeftModel

from flexlora_hf import FlexLoRAConfig, FlexLoRATrainer

TOKEN = "hf_test_token"


def test_trainer_push_to_hub_publishes_adapter_and_flexlora_card(local_hub: LocalHub, tmp_path):
    cfg = FlexLoRAConfig(r=4, lora_alpha=8, b0=1, t_warmup=2, t_final=2, delta_t=2, schedule="constant")
    args = training_args(str(tmp_path / "flex-run"), max_steps=8, hub_model_id="flex-run", hub_token=TOKEN)
    trainer = FlexLoRATrainer(
        model=trainer_bert(), args=args, train_dataset=cls_dataset(), eval_dataset=cls_dataset(n=16), flexlora_config=cfg
    )
    trainer.train()
    trainer.evaluate()
    url = trainer.push_to_hub()
    assert url == f"{local_hub.endpoint}/tester/flex-run/commit/{model_info('tester/flex-run').sha}"  # the new head
    files = local_hub.files("tester/flex-run")
    assert {"adapter_config.json", "flexlora_adapter.safetensors", "rank_heatmap.png", "README.md"} <= set(files)
    meta = yaml.safe_load(files["README.md"].decode().split("---\n", 2)[1])
    assert meta["library_name"] == "peft"
    assert "flexlora" in meta["tags"]
    card = files["README.md"].decode()
    assert "learning_rate" in card  # training hyper-parameters from TrainingArguments
    assert f"{trainer.state.log_history[-1]['eval_loss']:.4g}"[:4] in card  # latest eval metrics
    # The pushed export loads in stock PEFT and reproduces the trained model's logits.
    fm = trainer.flexlora_model.eval()
    ids = torch.tensor(cls_dataset(n=4)["input_ids"])
    expected = fm(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(trainer_bert(), "tester/flex-run").eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
