"""Tests for `flexlora_hf.data.metrics`: GLUE metrics checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import EvalPrediction

from flexlora_hf.data.metrics import (
    GLUE_MAIN_METRIC,
    accuracy,
    binary_f1,
    classification_metrics,
    compute_metrics_for_task,
    compute_task_metrics,
    glue_metrics,
    macro_f1,
    main_metric,
    matthews_correlation,
    normalize_glue_task,
    pearson_spearman,
)

# preds / refs with TP=1, FP=1, TN=2, FN=0 for the positive class 1.
PREDS = [1, 1, 0, 0]
REFS = [1, 0, 0, 0]


def test_accuracy_by_hand():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5)
    assert accuracy(np.array([[2], [1]]), [2, 1]) == 1.0  # shapes are flattened


def test_matthews_by_hand():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 0) / sqrt(2*1*3*2)
    assert matthews_correlation(PREDS, REFS) == pytest.approx(2 / math.sqrt(12))
    assert matthews_correlation([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_correlation([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant prediction


def test_binary_f1_by_hand():
    # precision 1/2, recall 1/1 -> F1 = 2 * 0.5 * 1 / 1.5
    assert binary_f1(PREDS, REFS) == pytest.approx(2 / 3)
    assert binary_f1([0, 0], [1, 0]) == 0.0  # no predicted positive


def test_macro_f1_by_hand():
    # class 0: F1 1; class 1: P 1, R 1/2 -> 2/3; class 2: P 1/2, R 1 -> 2/3
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_pearson_spearman_by_hand():
    # x - mean = (-1, 0, 1), y - mean = (-1, 1, 0): cov 1, var 2 and 2 -> r = 0.5; the values are their own ranks.
    out = pearson_spearman([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert out["pearson"] == pytest.approx(0.5)
    assert out["spearmanr"] == pytest.approx(0.5)
    assert out["combined_score"] == pytest.approx(0.5)
    # monotone but not linear: Spearman 1, Pearson < 1
    out = pearson_spearman([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 10.0])
    assert out["spearmanr"] == pytest.approx(1.0)
    assert out["pearson"] < 0.95
    assert math.isnan(pearson_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"])


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("cola", {"matthews_correlation": 2 / math.sqrt(12)}),
        ("mrpc", {"accuracy": 0.75, "f1": 2 / 3, "combined_score": (0.75 + 2 / 3) / 2}),
        ("qqp", {"accuracy": 0.75, "f1": 2 / 3, "combined_score": (0.75 + 2 / 3) / 2}),
        ("sst2", {"accuracy": 0.75}),
        ("mnli", {"accuracy": 0.75}),
        ("mnli_mismatched", {"accuracy": 0.75}),
        ("qnli", {"accuracy": 0.75}),
        ("rte", {"accuracy": 0.75}),
        ("wnli", {"accuracy": 0.75}),
    ],
)
def test_glue_metric_sets(task, expected):
    out = glue_metrics(task, PREDS, REFS)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value)


def test_stsb_is_regression():
    out = glue_metrics("stsb", [0.5, 2.0, 4.5], [1.0, 3.0, 2.0])
    assert set(out) == {"pearson", "spearmanr", "combined_score"}
    assert out["spearmanr"] == pytest.approx(0.5)


def test_aliases_and_unknown_task():
    assert normalize_glue_task("SST-2") == "sst2"
    assert normalize_glue_task("STS-B") == "stsb"
    assert normalize_glue_task("MNLI-MM") == "mnli_mismatched"
    assert normalize_glue_task(None) is None
    with pytest.raises(KeyError, match="not a GLUE task"):
        glue_metrics("epistemic_reasoning", PREDS, REFS)


def test_generic_tasks():
    assert classification_metrics([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(
        {"accuracy": 0.75, "macro_f1": (1 + 2 / 3 + 2 / 3) / 3}
    )
    assert compute_task_metrics(None, [0, 1], [0, 0]) == pytest.approx({"accuracy": 0.5, "macro_f1": 1 / 3})
    reg = compute_task_metrics("my_scores", [1.0, 2.0, 4.0], [1.0, 2.0, 3.0], is_regression=True)
    assert reg["mse"] == pytest.approx(1 / 3)
    assert reg["spearmanr"] == pytest.approx(1.0)


def test_main_metric_matches_paper_table7():
    assert main_metric("cola") == "matthews_correlation"
    assert main_metric("STS-B") == "combined_score"
    assert main_metric("mrpc") == "combined_score"
    assert main_metric("rte") == "accuracy"
    assert main_metric("epistemic_reasoning") == "accuracy"
    assert main_metric(None, is_regression=True) == "combined_score"
    assert set(GLUE_MAIN_METRIC) >= {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}


def test_trainer_callable_argmaxes_logits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # -> 1, 0, 1, 0
    labels = np.array([1, 0, 0, 0])
    out = compute_metrics_for_task("mrpc")(EvalPrediction(predictions=logits, label_ids=labels))
    assert out == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "combined_score": (0.75 + 2 / 3) / 2})
    # tuple predictions (logits, hidden states) use the first element
    out = compute_metrics_for_task("cola")(EvalPrediction(predictions=(logits, None), label_ids=labels))
    assert out["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))
    scores = np.array([[1.0], [2.0], [3.0]])
    out = compute_metrics_for_task("stsb", is_regression=True)(
        EvalPrediction(predictions=scores, label_ids=np.array([1.0, 3.0, 2.0]))
    )
    assert out["pearson"] == pytest.approx(0.5)
