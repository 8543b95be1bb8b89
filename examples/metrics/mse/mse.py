"""Mean squared error as a local `evaluate` module: ``evaluate.load("examples/metrics/mse")`` works offline.

A short stand-in for the Hub's ``mse`` module (same name, inputs and output key) for scalar regression targets:
``evaluate.load("mse")`` downloads the module's code from the Hub, which this does not need.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean squared error: the mean of (prediction - reference)^2 (its square root with squared=False)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted values.
    references (`list` of `float`): ground-truth values.
    sample_weight (`list` of `float`, *optional*): one weight per example.
    squared (`bool`, defaults to `True`): `False` returns the root mean squared error.
Returns:
    mse (`float`): the (root) mean squared error; NaN for no examples.
Examples:
    >>> metric = evaluate.load("examples/metrics/mse")
    >>> metric.compute(predictions=[2.5, 0.0, 2, 8], references=[3, -0.5, 2, 7])
    {'mse': 0.375}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mse(evaluate.Metric):
    """`evaluate` metric: mean squared error of scalar predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None, squared=True) -> dict:
        errors = (np.asarray(predictions, dtype=np.float64) - np.asarray(references, dtype=np.float64)) ** 2
        if errors.size == 0:
            return {"mse": float("nan")}
        mse = float(np.average(errors, weights=sample_weight))
        return {"mse": mse if squared else float(np.sqrt(mse))}
