"""GLUE (and generic classification / regression) metrics computed locally with scikit-learn and SciPy.

This module owns the evaluation metrics of the example scripts. It reproduces what the Hub's ``glue`` metric
(``evaluate.load("glue", task)``) returns, without fetching anything from the Hub:

* CoLA: Matthews correlation (``matthews_correlation``);
* MRPC, QQP: accuracy and F1 of the positive class (``accuracy``, ``f1``), plus their mean (``combined_score``,
  the paper's "Combined Score", Table 7);
* STS-B: Pearson and Spearman correlations (``pearson``, ``spearmanr``), plus their mean (``combined_score``);
* SST-2, MNLI (matched / mismatched), QNLI, RTE, WNLI, AX: accuracy.

Any other task name (e.g. a BIG-bench task, or a local csv/json dataset) gets accuracy and macro-F1 for
classification, or the STS-B set for regression. [`compute_metrics_for_task`] returns a callable ready for
``Trainer(compute_metrics=...)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

GLUE_TASKS: tuple[str, ...] = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
"""The GLUE tasks of the ``nyu-mll/glue`` dataset that have training data (``ax`` is evaluation-only)."""

GLUE_MAIN_METRIC: dict[str, str] = {
    "cola": "matthews_correlation",
    "mnli": "accuracy",
    "mrpc": "combined_score",
    "qnli": "accuracy",
    "qqp": "combined_score",
    "rte": "accuracy",
    "sst2": "accuracy",
    "stsb": "combined_score",
    "wnli": "accuracy",
}
"""The score the paper reports for each GLUE task (Table 7): Matthews corr., accuracy, or the combined score."""

_ACCURACY_ONLY = {"sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans", "ax"}


def _as_1d(array: Any) -> np.ndarray:
    return np.asarray(array).reshape(-1)


def accuracy(predictions: Any, references: Any) -> float:
    """Share of predictions equal to the references.

    Args:
        predictions (`array-like`): predicted class ids.
        references (`array-like`): gold class ids.

    Returns:
        `float`: accuracy in [0, 1].
    """
    return float(accuracy_score(_as_1d(references), _as_1d(predictions)))


def matthews_correlation(predictions: Any, references: Any) -> float:
    """Matthews correlation coefficient (CoLA's metric); 0.0 when either side is constant.

    Args:
        predictions (`array-like`): predicted class ids.
        references (`array-like`): gold class ids.

    Returns:
        `float`: MCC in [-1, 1].
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(matthews_corrcoef(_as_1d(references), _as_1d(predictions)))


def binary_f1(predictions: Any, references: Any) -> float:
    """F1 of the positive class (label 1), as the GLUE metric computes it for MRPC and QQP.

    Args:
        predictions (`array-like`): predicted class ids (0/1).
        references (`array-like`): gold class ids (0/1).

    Returns:
        `float`: F1 in [0, 1]; 0.0 when there is no true or predicted positive.
    """
    return float(f1_score(_as_1d(references), _as_1d(predictions), average="binary", zero_division=0))


def macro_f1(predictions: Any, references: Any) -> float:
    """Unweighted mean of the per-class F1 scores (classes seen in either predictions or references).

    Args:
        predictions (`array-like`): predicted class ids.
        references (`array-like`): gold class ids.

    Returns:
        `float`: macro-F1 in [0, 1].
    """
    return float(f1_score(_as_1d(references), _as_1d(predictions), average="macro", zero_division=0))


def _correlation(fn: Callable[..., Any], x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan  # undefined for constant input (SciPy would warn and return nan too)
    return float(fn(x, y)[0])


def pearson_spearman(predictions: Any, references: Any) -> dict[str, float]:
    """Pearson and Spearman correlations (STS-B's metrics) and their mean.

    Args:
        predictions (`array-like`): predicted scores.
        references (`array-like`): gold scores.

    Returns:
        `dict`: ``pearson``, ``spearmanr`` and ``combined_score``; NaN when either side is constant.
    """
    x = _as_1d(predictions).astype(np.float64)
    y = _as_1d(references).astype(np.float64)
    pearson = _correlation(pearsonr, x, y)
    spearman = _correlation(spearmanr, x, y)
    return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}


def normalize_glue_task(task_name: str | None) -> str | None:
    """Lower-case a GLUE task name and map common aliases (``sst-2``, ``sts-b``, ``mnli-m``) to dataset names.

    Args:
        task_name (`str`, *optional*): a task name such as ``"SST-2"`` or ``"mnli_mismatched"``.

    Returns:
        `str` or `None`: the normalised name (``None`` stays ``None``).
    """
    if task_name is None:
        return None
    name = task_name.strip().lower().replace("-", "")
    aliases = {"mnlim": "mnli_matched", "mnlimm": "mnli_mismatched", "stsb": "stsb", "sst2": "sst2"}
    return aliases.get(name, name)


def glue_metrics(task_name: str, predictions: Any, references: Any) -> dict[str, float]:
    """The metrics of the Hub's GLUE metric for `task_name`, computed locally.

    Args:
        task_name (`str`):
            A GLUE task (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``, ``mnli_matched``,
            ``mnli_mismatched``, ``qnli``, ``rte``, ``wnli``, ``ax``, ``hans``).
        predictions (`array-like`): class ids (scores for ``stsb``).
        references (`array-like`): gold class ids (scores for ``stsb``).

    Returns:
        `dict`: metric name -> value (see the module docstring). MRPC, QQP and STS-B also get ``combined_score``.

    Raises:
        KeyError: if `task_name` is not a GLUE task.
    """
    task = normalize_glue_task(task_name)
    if task == "cola":
        return {"matthews_correlation": matthews_correlation(predictions, references)}
    if task == "stsb":
        return pearson_spearman(predictions, references)
    if task in ("mrpc", "qqp"):
        acc = accuracy(predictions, references)
        f1 = binary_f1(predictions, references)
        return {"accuracy": acc, "f1": f1, "combined_score": (acc + f1) / 2}
    if task in _ACCURACY_ONLY:
        return {"accuracy": accuracy(predictions, references)}
    raise KeyError(f"{task_name!r} is not a GLUE task; expected one of {', '.join(sorted(GLUE_MAIN_METRIC))}.")


def classification_metrics(predictions: Any, references: Any) -> dict[str, float]:
    """Accuracy and macro-F1 for any single-label classification task (e.g. BIG-bench tasks, local files).

    Args:
        predictions (`array-like`): predicted class ids.
        references (`array-like`): gold class ids.

    Returns:
        `dict`: ``accuracy`` and ``macro_f1``.
    """
    return {"accuracy": accuracy(predictions, references), "macro_f1": macro_f1(predictions, references)}


def compute_task_metrics(
    task_name: str | None, predictions: Any, references: Any, *, is_regression: bool = False
) -> dict[str, float]:
    """GLUE metrics for a GLUE task, else generic classification (or regression) metrics.

    Args:
        task_name (`str`, *optional*): a GLUE task name, or anything else / `None` for generic metrics.
        predictions (`array-like`): class ids, or scores when `is_regression`.
        references (`array-like`): gold class ids or scores.
        is_regression (`bool`, *optional*, defaults to `False`): score a regression task (Pearson / Spearman, MSE).

    Returns:
        `dict`: metric name -> value.
    """
    task = normalize_glue_task(task_name)
    if task is not None and (task in GLUE_MAIN_METRIC or task in _ACCURACY_ONLY):
        return glue_metrics(task, predictions, references)
    if is_regression:
        out = pearson_spearman(predictions, references)
        diff = _as_1d(predictions).astype(np.float64) - _as_1d(references).astype(np.float64)
        out["mse"] = float(np.mean(diff**2)) if diff.size else math.nan
        return out
    return classification_metrics(predictions, references)


def compute_metrics_for_task(
    task_name: str | None = None, *, is_regression: bool = False
) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` callable for `Trainer` that turns logits into predictions and scores them.

    Classification logits are arg-maxed over the last axis; regression outputs are squeezed.

    Args:
        task_name (`str`, *optional*): see [`compute_task_metrics`].
        is_regression (`bool`, *optional*, defaults to `False`): whether the model has a single regression output.

    Returns:
        `Callable[[EvalPrediction], dict]`: the function to pass as ``Trainer(compute_metrics=...)``.

    Example:

    ```python
    >>> trainer = FlexLoRATrainer(..., compute_metrics=compute_metrics_for_task("cola"))
    ```
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        preds = eval_pred.predictions
        if isinstance(preds, tuple):
            preds = preds[0]
        preds = np.asarray(preds)
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=-1)
        return compute_task_metrics(task_name, preds, eval_pred.label_ids, is_regression=is_regression)

    return compute_metrics


def main_metric(task_name: str | None, is_regression: bool = False) -> str:
    """Name of the headline metric for a task (the paper's column for GLUE tasks, ``accuracy`` otherwise).

    Args:
        task_name (`str`, *optional*): a GLUE task name, or anything else / `None`.
        is_regression (`bool`, *optional*, defaults to `False`): for non-GLUE regression tasks.

    Returns:
        `str`: a key of the dict [`compute_task_metrics`] returns.
    """
    task = normalize_glue_task(task_name)
    if task is not None and task in GLUE_MAIN_METRIC:
        return GLUE_MAIN_METRIC[task]
    if task is not None and task in _ACCURACY_ONLY:
        return "accuracy"
    return "combined_score" if is_regression else "accuracy"
