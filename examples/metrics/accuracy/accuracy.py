"""Accuracy as a local `evaluate` module: ``evaluate.load("examples/metrics/accuracy")`` works offline.

A short stand-in for the Hub's ``accuracy`` module (same name, inputs and output key), written for the examples:
``evaluate.load("accuracy")`` downloads the module's code from the Hub, which this does not need.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the share of predictions equal to their reference, (TP + TN) / (TP + TN + FP + FN)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the share of correct predictions; `False` returns their count.
    sample_weight (`list` of `float`, *optional*): one weight per example.
Returns:
    accuracy (`float`): in [0, 1] (or a count with `normalize=False`).
Examples:
    >>> metric = evaluate.load("examples/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """`evaluate` metric: accuracy of integer class predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None) -> dict:
        hits = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(hits) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        correct = float((hits * weights).sum())
        return {"accuracy": correct / float(weights.sum()) if normalize else correct}
