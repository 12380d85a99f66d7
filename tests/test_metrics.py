"""Bootstrap intervals: rows of one patient are resampled together (cluster bootstrap)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mil.metrics import binary_auroc, binary_average_precision, bootstrap_ci, classification_metrics
from mil.report import evaluate

CLASSES = ["neg", "pos"]


def _patients(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.3, n), 0, 1)
    return pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "y": y, "p": p})


def _evaluate(df, ids, n_boot=300):
    metric_fn = partial(classification_metrics, classes=CLASSES)
    arrays = lambda d: (d.y.to_numpy(), np.stack([1 - d.p.to_numpy(), d.p.to_numpy()], axis=1))  # noqa: E731
    return evaluate(df, ids, ["y"], ["p"], metric_fn, arrays, n_boot, seed=0)[0]["pooled"]["auroc"]


def test_slides_of_one_patient_are_resampled_together():
    """40 patients x 4 slides with the patient's prediction: the interval is the patients' interval.

    Resampling the 160 rows as independent would make it about half as wide (sqrt(4)).
    """
    patients = _patients()
    slides = patients.loc[patients.index.repeat(4)].reset_index(drop=True)
    slides.insert(1, "slide_id", [f"{p}-S{k}" for p, k in zip(slides.patient_id, np.tile(range(4), 40), strict=True)])
    by_patient = _evaluate(patients, ["patient_id"])
    by_slide = _evaluate(slides, ["patient_id", "slide_id"])
    assert by_slide == by_patient  # same point, same resampled patients, same interval
    rows = _evaluate(slides.assign(patient_id=slides.slide_id), ["patient_id", "slide_id"])  # as if independent
    assert rows["value"] == by_patient["value"]
    width = lambda r: r["ci_high"] - r["ci_low"]  # noqa: E731
    assert width(rows) < 0.7 * width(by_patient)


def test_cluster_bootstrap_matches_a_hand_computed_one():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(15), rng.integers(1, 4, 15))
    y = (groups % 2).astype(int)
    p = np.clip(0.5 + 0.2 * (2 * y - 1) + rng.normal(0, 0.3, len(y)), 0, 1)
    found = bootstrap_ci(lambda y, p: {"auroc": roc_auc_score(y, p) if 0 < y.sum() < len(y) else np.nan},
                         y, p, n_boot=200, seed=5, groups=groups)
    draw, values = np.random.default_rng(5), []
    for _ in range(200):
        idx = np.concatenate([np.flatnonzero(groups == g) for g in draw.integers(0, 15, 15)])
        if 0 < y[idx].sum() < len(idx):
            values.append(roc_auc_score(y[idx], p[idx]))
    assert found["auroc"] == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))
    # one row per group is exactly the row bootstrap
    rows = bootstrap_ci(lambda y, p: {"m": float(p.mean())}, y, p, n_boot=50, seed=2)
    assert bootstrap_ci(lambda y, p: {"m": float(p.mean())}, y, p, n_boot=50, seed=2, groups=np.arange(len(y))) == rows


def test_binary_auroc_and_average_precision_equal_scikit_learn_with_ties():
    """The bootstrap's own AUROC and AP (fast) give scikit-learn's values, also with tied scores and few bags."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        score = np.round(rng.random(n), int(rng.integers(1, 3)))  # many ties at 1-2 decimals
        if 0 < y.sum() < n:
            assert binary_auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
            assert binary_average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)
    assert np.isnan(binary_auroc(np.ones(4), np.arange(4.0))) and np.isnan(binary_average_precision(np.zeros(3), np.ones(3)))
    with_nan = np.array([0.1, np.nan, 0.8, 0.3])
    assert np.isnan(binary_auroc(np.array([0, 1, 1, 0]), with_nan))
    assert np.isnan(binary_average_precision(np.array([0, 1, 1, 0]), with_nan))


def test_a_one_class_cohort_is_said_once_not_left_as_nan_and_library_warnings(tmp_path, caplog):
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning

    from mil.report import write_report

    rng = np.random.default_rng(0)
    p = rng.random(20)
    df = pd.DataFrame({"patient_id": [f"P{i}" for i in range(20)], "MSI": "MSS", "prob_MSS": 1 - p, "prob_MSI-H": p})
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="mil.report"):
        warnings.simplefilter("always")
        result = write_report(df, "MSI", ["MSS", "MSI-H"], tmp_path, ["patient_id"], n_boot=20)
    assert np.isnan(result["pooled"]["auroc"]["value"])
    assert "Every one of the 20 labelled bags is MSI = 'MSS': AUROC and AP are undefined" in caplog.text
    assert "AUROC and AP are undefined" in (tmp_path / "summary.md").read_text()
    assert not [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert (tmp_path / "roc.png").is_file()
