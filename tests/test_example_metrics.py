"""The local `evaluate` metric modules shipped with the examples (``examples/metrics/<name>/<name>.py``).

Each module is loaded with ``evaluate.load(<folder>)`` the way the example scripts load it, in a fresh process with the
Hub unreachable (offline mode and an endpoint nobody listens on) and an empty modules cache, and must give the values
worked out by hand on tiny inputs, the same values scikit-learn / SciPy give, and the same as
`flexlora_hf.data.metrics` (what the examples computed before they went through `evaluate`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import EXAMPLES
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from flexlora_hf.data.metrics import glue_metrics

METRICS = EXAMPLES / "metrics"
RNG = np.random.default_rng(0)
CLS_PRED, CLS_REF = RNG.integers(0, 2, 40).tolist(), RNG.integers(0, 2, 40).tolist()
MULTI_PRED, MULTI_REF = RNG.integers(0, 3, 40).tolist(), RNG.integers(0, 3, 40).tolist()
REG_PRED, REG_REF = RNG.normal(size=40).round(3).tolist(), RNG.normal(size=40).round(3).tolist()

# Runs in a child process: every call of the examples' kind, results as JSON (NaN as null).
CHILD = r"""
import json, math, sys
import evaluate
out = {}
for key, (path, config, kwargs) in json.loads(sys.argv[1]).items():
    try:
        result = evaluate.load(path, config).compute(**kwargs)
        out[key] = {k: (None if isinstance(v, float) and math.isnan(v) else getattr(v, "tolist", lambda: v)())
                    for k, v in result.items()}
    except Exception as err:  # reported to the test, which decides whether it was expected
        out[key] = {"error": f"{type(err).__name__}: {err}"}
print(json.dumps(out))
"""

TOY = {"predictions": [0, 1, 1, 0], "references": [0, 1, 0, 0]}
CASES = {
    "accuracy": ("accuracy", None, TOY),
    "accuracy_count": ("accuracy", None, {**TOY, "normalize": False}),
    "accuracy_weighted": ("accuracy", None, {**TOY, "sample_weight": [1, 1, 2, 0]}),
    "f1": ("f1", None, TOY),
    "f1_macro": ("f1", None, {"predictions": [0, 1, 2, 0], "references": [0, 1, 2, 2], "average": "macro"}),
    "f1_per_class": ("f1", None, {"predictions": [0, 1, 2, 0], "references": [0, 1, 2, 2], "average": None}),
    "mse": ("mse", None, {"predictions": [2.5, 0.0, 2, 8], "references": [3, -0.5, 2, 7]}),
    "rmse": ("mse", None, {"predictions": [2.5, 0.0, 2, 8], "references": [3, -0.5, 2, 7], "squared": False}),
    "glue_mrpc": ("glue", "mrpc", TOY),
    "glue_sst2": ("glue", "sst2", TOY),
    "glue_cola": ("glue", "cola", TOY),
    "glue_stsb": ("glue", "stsb", {"predictions": [0.1, 1.2, 0.8, 3.3], "references": [0.0, 1.0, 1.5, 3.0]}),
    "glue_stsb_constant": ("glue", "stsb", {"predictions": [1.0, 1.0, 1.0], "references": [0.0, 1.0, 2.0]}),
    "glue_unknown": ("glue", "squad", TOY),
    "random_mrpc": ("glue", "mrpc", {"predictions": CLS_PRED, "references": CLS_REF}),
    "random_cola": ("glue", "cola", {"predictions": CLS_PRED, "references": CLS_REF}),
    "random_stsb": ("glue", "stsb", {"predictions": REG_PRED, "references": REG_REF}),
    "random_f1_macro": ("f1", None, {"predictions": MULTI_PRED, "references": MULTI_REF, "average": "macro"}),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every case computed in one offline child process with an empty HF cache (the modules are copied afresh)."""
    home = tmp_path_factory.mktemp("hf_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    cases = {key: (str(METRICS / name), config, kwargs) for key, (name, config, kwargs) in CASES.items()}
    cases["hub_name"] = ("accuracy", None, TOY)  # the control: what a stock script loads
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_shipped_module_is_a_folder_named_like_its_script():
    folders = sorted(p.name for p in METRICS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == ["accuracy", "f1", "glue", "mse"]
    assert all((METRICS / name / f"{name}.py").is_file() for name in folders)


def test_modules_load_offline_where_a_hub_name_cannot(results):
    assert "error" in results["hub_name"], results["hub_name"]  # the control: this environment reaches no Hub
    assert not [key for key, value in results.items() if "error" in value and key not in ("hub_name", "glue_unknown")]


def test_accuracy(results):
    assert results["accuracy"] == {"accuracy": 0.75}
    assert results["accuracy_count"] == {"accuracy": 3.0}
    assert results["accuracy_weighted"] == {"accuracy": pytest.approx(0.5)}  # (1 + 1 + 0·2 + 1·0) / 4


def test_f1(results):
    assert results["f1"] == {"f1": pytest.approx(2 / 3)}  # precision 1/2, recall 1
    assert results["f1_macro"] == {"f1": pytest.approx((2 / 3 + 1 + 2 / 3) / 3)}
    assert results["f1_per_class"]["f1"] == pytest.approx([2 / 3, 1.0, 2 / 3])
    expected = f1_score(MULTI_REF, MULTI_PRED, average="macro")
    assert results["random_f1_macro"]["f1"] == pytest.approx(expected)


def test_mse(results):
    assert results["mse"] == {"mse": pytest.approx(0.375)}  # (0.25 + 0.25 + 0 + 1) / 4
    assert results["rmse"] == {"mse": pytest.approx(math.sqrt(0.375))}


def test_glue(results):
    assert results["glue_mrpc"] == {"accuracy": 0.75, "f1": pytest.approx(2 / 3)}
    assert results["glue_sst2"] == {"accuracy": 0.75}
    # TP = 1, TN = 2, FP = 1, FN = 0: (1·2 - 1·0) / sqrt(2 · 1 · 3 · 2)
    assert results["glue_cola"] == {"matthews_correlation": pytest.approx(2 / math.sqrt(12))}
    stsb = results["glue_stsb"]
    x, y = [0.1, 1.2, 0.8, 3.3], [0.0, 1.0, 1.5, 3.0]
    assert stsb == {"pearson": pytest.approx(pearsonr(x, y)[0]), "spearmanr": pytest.approx(0.8)}  # one swap
    assert results["glue_stsb_constant"] == {"pearson": None, "spearmanr": None}  # NaN: undefined, not 0
    assert "KeyError" in results["glue_unknown"]["error"] and "mrpc" in results["glue_unknown"]["error"]


def test_glue_matches_scipy_sklearn_and_the_previous_local_metrics(results):
    assert results["random_cola"]["matthews_correlation"] == pytest.approx(matthews_corrcoef(CLS_REF, CLS_PRED))
    assert results["random_stsb"]["spearmanr"] == pytest.approx(spearmanr(REG_PRED, REG_REF)[0])
    for task in ("mrpc", "cola", "stsb"):
        previous = glue_metrics(task, *((REG_PRED, REG_REF) if task == "stsb" else (CLS_PRED, CLS_REF)))
        previous.pop("combined_score", None)  # added by the example script, as transformers' run_glue does
        assert results[f"random_{task}"] == pytest.approx(previous), task
