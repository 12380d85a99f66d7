"""Evaluation metrics on saved predictions, with bootstrap confidence intervals.

Training-time metrics use torchmetrics (inside the LightningModule); this module works on
the numpy arrays of a ``predictions.csv`` so that any predictions file, from
cross-validation or an external cohort, is scored the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

CLASSIFICATION_METRICS = ("auroc", "ap", "balanced_accuracy", "f1")


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUROC, average precision, balanced accuracy and F1.

    Binary (two columns): scores of the last (positive) class. Multi-class: macro averages,
    one-vs-rest AUROC. Metrics undefined for the data (one class present) are NaN.
    """
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    out = {"n": float(len(y))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        if n_classes == 2:
            out["f1"] = float(f1_score(y, pred, pos_label=1, zero_division=0))
        else:
            out["f1"] = float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0))
        if len(np.unique(y)) < 2:
            out["auroc"] = out["ap"] = math.nan
        elif n_classes == 2:
            out["auroc"] = float(roc_auc_score(y, probs[:, 1]))
            out["ap"] = float(average_precision_score(y, probs[:, 1]))
        else:
            present = np.unique(y)
            onehot = np.eye(n_classes)[y][:, present]
            out["auroc"] = float(roc_auc_score(onehot, probs[:, present], average="macro"))
            out["ap"] = float(average_precision_score(onehot, probs[:, present], average="macro"))
    return {k: out[k] for k in ("auroc", "ap", "balanced_accuracy", "f1", "n")}


def bootstrap_ci(
    metric_fn: Callable[..., dict[str, float]],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric ``metric_fn(*arrays)`` returns.

    Rows are resampled with replacement; resamples where a metric is undefined are ignored.
    """
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for key, value in metric_fn(*(a[idx] for a in arrays)).items():
            samples.setdefault(key, []).append(value)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    result = {}
    for key, values in samples.items():
        v = np.asarray(values)
        v = v[np.isfinite(v)]
        result[key] = (float(np.quantile(v, lo)), float(np.quantile(v, hi))) if len(v) else (math.nan, math.nan)
    return result


def with_intervals(
    metric_fn: Callable[..., dict[str, float]], *arrays: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for the pooled arrays."""
    point = metric_fn(*arrays)
    ci = bootstrap_ci(metric_fn, *arrays, n_boot=n_boot, seed=seed)
    return {
        k: {"value": v, "ci_low": ci[k][0], "ci_high": ci[k][1]} if k != "n" else {"value": v}
        for k, v in point.items()
    }


def mean_std(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each metric across folds (NaNs ignored)."""
    keys = [k for k in per_fold[0] if k != "n"]
    out = {}
    for k in keys:
        v = np.array([m[k] for m in per_fold], dtype=float)
        v = v[np.isfinite(v)]
        out[k] = {
            "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
        }
    return out
