"""The GLUE metric as a local `evaluate` module: ``evaluate.load("examples/metrics/glue", "mrpc")`` works offline.

A short stand-in for the Hub's ``glue`` module: the configuration is the task and the result has the same keys
(CoLA: ``matthews_correlation``; STS-B: ``pearson``, ``spearmanr``; MRPC, QQP: ``accuracy``, ``f1``; the others:
``accuracy``), computed with scikit-learn and SciPy. ``evaluate.load("glue", task)`` downloads the module's code from
the Hub, which this does not need. STS-B scores are kept in float64 (the Hub's module stores float32), and a
correlation of constant input is NaN without SciPy's warning.
"""

import math

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli")
_TASKS += ("hans", "ax")
_DESCRIPTION = "GLUE: the metric of each General Language Understanding Evaluation task, by task name."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list`): predicted labels (scores for `stsb`).
    references (`list`): ground-truth labels (scores for `stsb`).
Returns:
    `cola`: `matthews_correlation`; `stsb`: `pearson` and `spearmanr`; `mrpc`, `qqp`: `accuracy` and `f1` (of
    label 1); every other task: `accuracy`.
Examples:
    >>> metric = evaluate.load("examples/metrics/glue", "mrpc")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75, 'f1': 0.6666666666666666}
"""


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan  # undefined for constant input
    return float(fn(x, y)[0])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """`evaluate` metric: the GLUE task metric named by the configuration."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _TASKS:
            raise KeyError(f"Unknown GLUE task {self.config_name!r}: load with one of {', '.join(_TASKS)}.")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions, references) -> dict:
        preds, refs = np.asarray(predictions), np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
        if self.config_name == "stsb":
            preds, refs = preds.astype(np.float64), refs.astype(np.float64)
            return {"pearson": _correlation(pearsonr, preds, refs), "spearmanr": _correlation(spearmanr, preds, refs)}
        accuracy = float((preds == refs).mean())
        if self.config_name in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": float(f1_score(refs, preds, zero_division=0))}
        return {"accuracy": accuracy}
