"""F1 as a local `evaluate` module: ``evaluate.load("examples/metrics/f1")`` works offline.

A short stand-in for the Hub's ``f1`` module (same name, inputs, ``average`` choices and output key), computed with
scikit-learn: ``evaluate.load("f1")`` downloads the module's code from the Hub, which this does not need.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "F1: the harmonic mean of precision and recall, 2 * (precision * recall) / (precision + recall)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    labels (`list` of `int`, *optional*): the labels to include when `average` is not `"binary"`.
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    average (`str`, defaults to `"binary"`): `"binary"`, `"micro"`, `"macro"`, `"weighted"`, `"samples"`, or `None`
        for one score per class.
    sample_weight (`list` of `float`, *optional*): one weight per example.
Returns:
    f1 (`float`, or an array of floats with `average=None`): in [0, 1]; 0.0 where precision and recall are both 0.
Examples:
    >>> metric = evaluate.load("examples/metrics/f1")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """`evaluate` metric: F1 score of integer class predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=0,
        )
        return {"f1": float(score) if np.ndim(score) == 0 else score}
