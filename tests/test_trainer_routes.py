"""Every route a stock Trainer script takes through `FlexLoRATrainer` works as with `Trainer`, or is refused with an
error that names the fix; none trains nothing. One test per route, on tiny random models (real Trainer runs).

Routes: the stock example flow (train, save_model, metrics, save_state, evaluate, predict, create_model_card), its
`push_to_hub(**kwargs)` ending, user optimizers and schedulers, a second `train()` with and without
`resume_from_checkpoint`, `train()` after `load_best_model_at_end`, resume at another `max_steps`,
EarlyStoppingCallback, and `evaluate()` before `train()`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from helpers import cls_dataset, lm_dataset, trainer_bert, trainer_llama, training_args
from hub_stub import LocalHub
from peft import PeftModel
from transformers import EarlyStoppingCallback, Trainer

from flexlora_hf import FlexLoRACallback, FlexLoRAConfig, FlexLoRAModel, FlexLoRATrainer, get_flexlora_model
from flexlora_hf.io.model_card import rank_tables
from flexlora_hf.optim.surgery import StaleOptimizerError, unwrap_optimizer

SCHED = dict(r=4, lora_alpha=8, b0=2, t_warmup=4, t_final=4, delta_t=2, schedule="constant")
SHORT = {**SCHED, "t_warmup": 2, "t_final": 2}  # events at steps 4 and 6 of an 8-step run
TOKEN = "hf_test_token"  # the `local_hub` fixture's user "tester"
# What run_glue.py passes to create_model_card / push_to_hub at its end.
STOCK_CARD = dict(
    finetuned_from="google-bert/bert-base-uncased", tasks="text-classification", language="en",
    dataset_tags="glue", dataset_args="mrpc", dataset="GLUE MRPC",
)


def _adapter(fm: FlexLoRAModel) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": getattr(layer, k).detach().clone()
            for n, layer in fm.flexlora_layers() for k in ("lora_P", "lora_lam", "lora_Q")}


def _max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) if a[k].shape == b[k].shape else math.inf for k in a)


def _all_finite(fm: FlexLoRAModel) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _adapter(fm).values())


def _accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _llama_trainer(out, cfg: dict | None = None, **args) -> FlexLoRATrainer:
    return FlexLoRATrainer(model=trainer_llama(), args=training_args(str(out), **{"max_steps": 12, **args}),
                           train_dataset=lm_dataset(), eval_dataset=lm_dataset(n=16, seed=1),
                           flexlora_config=FlexLoRAConfig(**{**SCHED, **(cfg or {})}))


# ------------------------------------------------------------------------------------- the stock example flow
def test_stock_example_flow_ends_with_our_rank_map_card(tmp_path) -> None:
    out = tmp_path / "glue"
    trainer = FlexLoRATrainer(model=trainer_bert(), args=training_args(str(out), max_steps=8),
                              train_dataset=cls_dataset(), eval_dataset=cls_dataset(n=16, seed=1),
                              compute_metrics=_accuracy, flexlora_config=FlexLoRAConfig(**SHORT))
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    predictions = trainer.predict(cls_dataset(n=8, seed=2))
    trainer.create_model_card(**STOCK_CARD)  # raised AttributeError (create_or_update_model_card) before

    assert {"flexlora_config.json", "adapter_model.safetensors", "all_results.json", "trainer_state.json"} <= {
        p.name for p in out.iterdir()}
    assert predictions.predictions.shape == (8, 3) and "test_accuracy" in predictions.metrics
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "peft" and "flexlora" in meta["tags"]
    assert meta["base_model"] == "google-bert/bert-base-uncased"  # finetuned_from
    assert meta["pipeline_tag"] == "text-classification" and meta["language"] == ["en"]
    assert meta["datasets"] == ["glue"]
    (result_entry,) = meta["model-index"][0]["results"]
    assert result_entry["task"]["type"] == "text-classification"
    assert result_entry["dataset"] == {"name": "GLUE MRPC", "type": "glue", "config": "mrpc"}
    reported = {m["type"]: m["value"] for m in result_entry["metrics"]}
    assert reported == {"loss": pytest.approx(metrics["eval_loss"]), "accuracy": pytest.approx(metrics["eval_accuracy"])}
    assert rank_tables(trainer.flexlora_model.rank_map())[0] in text  # the rank map, as a layer x module table
    assert "(rank_heatmap.png)" in text and "learning_rate" in text


def test_push_to_hub_with_stock_kwargs_keeps_the_rank_map(local_hub: LocalHub, tmp_path) -> None:
    out = tmp_path / "flex-glue"
    # args.push_to_hub as the stock --push_to_hub sets it: the Trainer also pushes every checkpoint while training.
    args = training_args(str(out), max_steps=8, push_to_hub=True, hub_token=TOKEN, save_strategy="steps", save_steps=4)
    trainer = FlexLoRATrainer(model=trainer_bert(), args=args, train_dataset=cls_dataset(),
                              eval_dataset=cls_dataset(n=16, seed=1), compute_metrics=_accuracy,
                              flexlora_config=FlexLoRAConfig(**SHORT))
    trainer.train()  # waits for its last checkpoint push
    ids = torch.tensor(cls_dataset(n=4)["input_ids"])
    with torch.no_grad():  # a checkpoint push holds both views of one adapter (the PEFT view alone before)
        native = FlexLoRAModel.from_pretrained(trainer_bert(), "tester/flex-glue")(input_ids=ids).logits
        peft = PeftModel.from_pretrained(trainer_bert(), "tester/flex-glue").eval()(input_ids=ids).logits
    torch.testing.assert_close(peft, native, atol=1e-5, rtol=1e-4)
    trainer.evaluate()
    with pytest.raises(TypeError, match="unexpected keyword.*datset_tags"):
        trainer.push_to_hub(datset_tags="glue")  # refused before anything is uploaded
    assert "README.md" not in local_hub.files("tester/flex-glue") or "GLUE MRPC" not in local_hub.files(
        "tester/flex-glue")["README.md"].decode()

    trainer.push_to_hub(**STOCK_CARD)
    files = local_hub.files("tester/flex-glue")
    card = files["README.md"].decode()
    assert card == (out / "README.md").read_text()  # output_dir holds the card that was pushed
    meta = _front_matter(card)
    assert meta["base_model"] == "google-bert/bert-base-uncased" and meta["datasets"] == ["glue"]
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "GLUE MRPC"
    assert rank_tables(trainer.flexlora_model.rank_map())[0] in card
    assert 'PeftModel.from_pretrained(base, "tester/flex-glue")' in card
    assert json.loads(files["rank_map.json"]) == trainer.flexlora_model.rank_map()


# ------------------------------------------------------------------------------------- user optimizers
def test_user_optimizer_built_before_capacity_is_final_is_refused(tmp_path) -> None:
    fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SCHED))  # no total_steps: slots grow at train start
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=5e-3)
    trainer = FlexLoRATrainer(model=fm, args=training_args(str(tmp_path), max_steps=12), train_dataset=lm_dataset(),
                              optimizers=(opt, None))
    with pytest.raises(StaleOptimizerError, match=r"(?s)does not hold \d+ trainable.*total_steps.*finalize_capacity"):
        trainer.train()
    assert trainer.state.global_step == 0  # before the first step


@pytest.mark.parametrize("how", ["total_steps", "finalize_capacity"])
def test_user_optimizer_and_scheduler_train_when_capacity_is_final(tmp_path, how: str) -> None:
    steps = 12
    if how == "total_steps":
        fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SCHED, total_steps=steps))
    else:
        fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SCHED))
        fm.finalize_capacity(steps)
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # visibly the user's: half the rate throughout
    before = _adapter(fm)
    trainer = FlexLoRATrainer(model=fm, args=training_args(str(tmp_path), max_steps=steps),
                              train_dataset=lm_dataset(), optimizers=(opt, sched))
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is opt and trainer.lr_scheduler is sched
    after = _adapter(fm)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every P, λ and Q of every matrix trained
    assert [e["step"] for e in fm.rank_history] == [6, 8]  # the events ran on the user's optimizer
    assert all(e["learning_rate"] == pytest.approx(2.5e-3) for e in trainer.state.log_history if "learning_rate" in e)


def test_trainer_built_optimizer_from_optimizer_cls_and_kwargs(tmp_path) -> None:
    fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SHORT))  # the Trainer builds it after the slots grew
    before = _adapter(fm)
    trainer = FlexLoRATrainer(model=fm, args=training_args(str(tmp_path), max_steps=8), train_dataset=lm_dataset(),
                              optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}))
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), torch.optim.SGD)
    after = _adapter(fm)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_guard_refuses_any_optimizer_missing_adapter_tensors_also_without_the_mixin(tmp_path) -> None:
    fm = get_flexlora_model(trainer_llama(), FlexLoRAConfig(**SHORT, total_steps=8))
    heads_only = torch.optim.AdamW([p for n, p in fm.named_parameters() if p.requires_grad and "lora_lam" not in n])
    trainer = Trainer(model=fm, args=training_args(str(tmp_path), max_steps=8), train_dataset=lm_dataset(),
                      optimizers=(heads_only, None), callbacks=[FlexLoRACallback()])
    with pytest.raises(StaleOptimizerError, match=r"lora_lam"):
        trainer.train()


# ------------------------------------------------------------------------------------- second train() / resume
def test_second_train_resumes_from_a_mid_checkpoint_like_an_uninterrupted_run(tmp_path) -> None:
    trainer = _llama_trainer(tmp_path, save_strategy="steps", save_steps=6)  # events at 6 and 8
    trainer.train()
    fm = trainer.flexlora_model
    end, ranks, history = _adapter(fm), fm.rank_map(), [(e["step"], e["prune"], e["expand"]) for e in fm.rank_history]
    mid = FlexLoRAModel.from_pretrained(trainer_llama(), tmp_path / "checkpoint-6", is_trainable=True)

    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))  # the same Trainer, resumed
    assert _max_change(_adapter(mid), _adapter(fm)) > 1e-3  # the resumed run trained (it updated nothing before)
    assert _max_change(end, _adapter(fm)) < 1e-5  # and ends where the uninterrupted run ended
    assert fm.rank_map() == ranks
    assert [(e["step"], e["prune"], e["expand"]) for e in fm.rank_history] == history


def test_second_train_without_resume_trains_again_with_a_new_optimizer(tmp_path) -> None:
    trainer = _llama_trainer(tmp_path)
    trainer.train()
    fm = trainer.flexlora_model
    first_optimizer, end = unwrap_optimizer(trainer.optimizer), _adapter(fm)
    assert any(layer.slot_birth for _, layer in fm.flexlora_layers())  # young directions from the first run

    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is not first_optimizer
    assert _all_finite(fm)  # the first run's direction births do not enter the new run's Adam correction
    assert _max_change(end, _adapter(fm)) > 1e-3
    assert trainer.state.global_step == 12 and math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_train_after_load_best_model_at_end_trains(tmp_path) -> None:
    trainer = _llama_trainer(tmp_path, SHORT, max_steps=8, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                             save_steps=4, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                             greater_is_better=False)
    trainer.train()
    fm = trainer.flexlora_model
    best = trainer.state.best_model_checkpoint
    assert best is not None and fm.rank_history[-1]["loaded_best_model_checkpoint"] == best
    loaded = _adapter(fm)

    trainer.train()
    assert _all_finite(fm) and _max_change(loaded, _adapter(fm)) > 1e-3


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> str:
    """checkpoint-6 of a 12-step run whose config has no total_steps (events at 6 and 8)."""
    out = tmp_path_factory.mktemp("first")
    _llama_trainer(out, save_strategy="steps", save_steps=6).train()
    return str(out / "checkpoint-6")


def test_resume_at_another_max_steps_keeps_the_checkpoint_schedule(tmp_path, mid_checkpoint: str) -> None:
    mid = _adapter(FlexLoRAModel.from_pretrained(trainer_llama(), mid_checkpoint, is_trainable=True))
    longer = _llama_trainer(tmp_path / "longer", max_steps=24)
    longer.train(resume_from_checkpoint=mid_checkpoint)
    fm = longer.flexlora_model
    assert longer.state.global_step == 24 and fm.flexlora_config.total_steps == 12  # the checkpoint's schedule
    assert [e["step"] for e in fm.rank_history] == [6, 8]
    assert _all_finite(fm) and _max_change(mid, _adapter(fm)) > 1e-3

    explicit = _llama_trainer(tmp_path / "explicit", cfg={"total_steps": 40}, max_steps=40)
    with pytest.raises(ValueError, match=r"(?s)Cannot resume.*total_steps=40.*set it to 12"):
        explicit.train(resume_from_checkpoint=mid_checkpoint)


def test_new_run_from_a_mid_run_adapter_without_resume(tmp_path, mid_checkpoint: str) -> None:
    # A warm start: the adapter of a checkpoint (with young directions born at step 6), a new run from step 0.
    fm = FlexLoRAModel.from_pretrained(trainer_llama(), mid_checkpoint, is_trainable=True)
    assert any(layer.slot_birth for _, layer in fm.flexlora_layers())
    before = _adapter(fm)
    trainer = FlexLoRATrainer(model=fm, args=training_args(str(tmp_path), max_steps=8), train_dataset=lm_dataset())
    trainer.train()  # the births are from another run: they used to reach the Adam correction ("math domain error")
    assert _all_finite(fm) and _max_change(before, _adapter(fm)) > 1e-3


# ------------------------------------------------------------------------------------- evaluation routes
def test_early_stopping_with_best_model_at_end(tmp_path) -> None:
    # "Best" is the highest eval loss, so the best checkpoint is the first one and not the one training stops at
    # (the loss falls): the reload must really change the adapter.
    trainer = _llama_trainer(tmp_path, max_steps=16, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                             save_steps=4, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                             greater_is_better=True)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.train()
    fm = trainer.flexlora_model
    assert trainer.state.global_step == 8 and trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best = FlexLoRAModel.from_pretrained(trainer_llama(), tmp_path / "checkpoint-4", is_trainable=True)
    last = FlexLoRAModel.from_pretrained(trainer_llama(), tmp_path / "checkpoint-8", is_trainable=True)
    assert _max_change(_adapter(best), _adapter(fm)) == 0.0  # the model holds the best checkpoint's adapter
    assert _max_change(_adapter(last), _adapter(fm)) > 1e-3
    assert fm.rank_map() == json.loads((tmp_path / "checkpoint-4" / "rank_map.json").read_text())
    assert (tmp_path / "rank_history.json").is_file()


def test_evaluate_before_train(tmp_path) -> None:
    trainer = _llama_trainer(tmp_path, max_steps=12)
    before = trainer.evaluate()
    assert math.isfinite(before["eval_loss"])
    trainer.train()
    assert [e["step"] for e in trainer.flexlora_model.rank_history] == [6, 8]
    assert trainer.evaluate()["eval_loss"] < before["eval_loss"]
