"""Evaluation metrics on saved predictions, with bootstrap confidence intervals.

Training-time metrics use torchmetrics (inside the LightningModule); this module works on
the numpy arrays of a ``predictions.csv`` so that any predictions file, from
cross-validation or an external cohort, is scored the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

CLASSIFICATION_METRICS = ("auroc", "ap", "balanced_accuracy", "accuracy", "f1")
BINARY_CALL_METRICS = ("sensitivity", "specificity")  # of the positive (last) class, from the calls
REGRESSION_METRICS = ("pearson", "spearman", "mae", "r2")
SURVIVAL_METRICS = ("c_index",)
COUNTS = ("n", "n_events")  # reported as they are (integers): no interval, no mean across folds
# Where a metric's values lie: bootstrap interval ends are clipped to it.
RANGES = {"auroc": (0.0, 1.0), "ap": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "accuracy": (0.0, 1.0),
          "f1": (0.0, 1.0), "sensitivity": (0.0, 1.0), "specificity": (0.0, 1.0), "c_index": (0.0, 1.0),
          "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0), "mae": (0.0, math.inf), "r2": (-math.inf, 1.0)}


def confusion_scores(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Balanced accuracy, accuracy and F1 from the confusion matrix (as scikit-learn defines them).

    Balanced accuracy: mean recall over the classes present in ``y``. F1: of class 1 when
    binary, else the macro mean over all classes; 0 where undefined (``zero_division=0``).
    Computed here because scikit-learn's input checks dominate thousands of bootstrap calls.
    """
    counts = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp, support, predicted = np.diag(counts).astype(float), counts.sum(axis=1), counts.sum(axis=0)
    present = support > 0
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return {
        "balanced_accuracy": float((tp[present] / support[present]).mean()) if present.any() else math.nan,
        "accuracy": float(tp.sum() / len(y)) if len(y) else math.nan,
        "f1": float(f1[1] if n_classes == 2 else f1.mean()),
    }


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` [n] for binary ``y`` [n] (1 = positive), as scikit-learn's
    ``roc_auc_score``: the Mann-Whitney U statistic over n_pos x n_neg, tied scores counting 1/2
    (Hanley & McNeil 1982, Radiology 143:29), from midranks. NaN unless both classes are present.
    Computed here, like :func:`confusion_scores`, because scikit-learn's input checks dominate a bootstrap."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg or not np.isfinite(score).all():
        return math.nan
    ranks = stats.rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision of ``score`` [n] for binary ``y`` [n], as scikit-learn's ``average_precision_score``:
    the sum over distinct score thresholds (high to low) of the rise in recall times the precision
    there (no interpolation). NaN without positives or with a non-finite score."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=np.float64)
    if not y.any() or not np.isfinite(score).all():
        return math.nan
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row at each distinct threshold
    tp = np.cumsum(hits)[last]
    precision, recall = tp / (last + 1), tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, calls: np.ndarray | None = None, classes: Sequence[str] | None = None
) -> dict[str, float]:
    """AUROC, average precision, balanced accuracy, accuracy and F1 (+ sensitivity, specificity if binary).

    ``y`` [n] class indices, ``probs`` [n, C]; ``calls`` [n] the called class indices (e.g. a
    binary threshold from :mod:`mil.thresholds`), default the argmax. AUROC and AP use the
    probabilities; the other metrics use the calls. Binary (two columns): scores of the last
    (positive) class. Multi-class: macro averages, one-vs-rest AUROC, plus ``auroc_<class>``
    per class when ``classes`` names them. Metrics undefined for the data (one class present) are NaN.
    """
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    calls = probs.argmax(axis=1) if calls is None else np.asarray(calls).astype(int)
    out = {"n": len(y), **confusion_scores(y, calls, n_classes)}
    if n_classes == 2:
        pos, neg = y == 1, y == 0
        out["sensitivity"] = float((calls[pos] == 1).mean()) if pos.any() else math.nan
        out["specificity"] = float((calls[neg] == 0).mean()) if neg.any() else math.nan
    per_class = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(np.unique(y)) < 2:
            out["auroc"] = out["ap"] = math.nan
        elif n_classes == 2:
            out["auroc"] = binary_auroc(y, probs[:, 1])
            out["ap"] = binary_average_precision(y, probs[:, 1])
        else:
            present = np.unique(y)
            onehot = np.eye(n_classes)[y][:, present]
            out["auroc"] = float(roc_auc_score(onehot, probs[:, present], average="macro"))
            out["ap"] = float(average_precision_score(onehot, probs[:, present], average="macro"))
        if classes is not None and n_classes > 2:
            for i, c in enumerate(classes):
                hit = y == i
                per_class[f"auroc_{c}"] = float(roc_auc_score(hit, probs[:, i])) if 0 < hit.sum() < len(y) else math.nan
    binary = {k: out[k] for k in BINARY_CALL_METRICS if k in out}
    return {**{k: out[k] for k in CLASSIFICATION_METRICS}, **binary, **per_class, "n": out["n"]}


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson r, Spearman rho, mean absolute error and R² (NaN where undefined)."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    out = {"pearson": math.nan, "spearman": math.nan, "mae": float(np.abs(y - pred).mean()) if len(y) else math.nan}
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    out["r2"] = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan
    if len(y) > 2 and np.ptp(y) > 0 and np.ptp(pred) > 0:
        out["pearson"] = float(stats.pearsonr(y, pred).statistic)
        out["spearman"] = float(stats.spearmanr(y, pred).statistic)
    return {**out, "n": len(y)}


def concordance_index(risk: np.ndarray, time: np.ndarray, event: np.ndarray, chunk: int = 512) -> float:
    """Harrell's C: of the comparable pairs, the fraction ordered correctly by risk.

    A pair is comparable when the shorter time is an event (or both times tie and only the
    other is censored); it is concordant when that bag has the higher risk, and counts 1/2
    for tied risks. Pairs are counted in blocks of ``chunk`` events to bound memory.
    """
    risk, time = np.asarray(risk, dtype=np.float64), np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    concordant = comparable = 0.0
    events = np.flatnonzero(event)
    for block in np.array_split(events, max(1, math.ceil(len(events) / chunk))):
        t, r = time[block, None], risk[block, None]
        pair = (time[None, :] > t) | ((time[None, :] == t) & ~event[None, :])
        concordant += float((pair & (risk[None, :] < r)).sum()) + 0.5 * float((pair & (risk[None, :] == r)).sum())
        comparable += float(pair.sum())
    return concordant / comparable if comparable else math.nan


def survival_metrics(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> dict[str, float]:
    """Concordance index of the risk scores, with the number of bags and of events."""
    return {
        "c_index": concordance_index(risk, time, event),
        "n": len(risk),
        "n_events": int(np.asarray(event).sum()),
    }


def logrank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """Two-sided log-rank p-value between ``group`` True and False (NaN when undefined)."""
    time, event, group = np.asarray(time, dtype=np.float64), np.asarray(event).astype(bool), np.asarray(group).astype(bool)
    if group.all() or not group.any() or not event.any():
        return math.nan
    a, b = (stats.CensoredData(uncensored=time[g & event], right=time[g & ~event]) for g in (group, ~group))
    return float(stats.logrank(a, b).pvalue)


def bootstrap_ci(
    metric_fn: Callable[..., dict[str, float]],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric ``metric_fn(*arrays)`` returns.

    Rows are resampled with replacement; with ``groups`` (e.g. the patient of each slide row),
    whole groups are resampled instead (the cluster bootstrap, Field & Welsh 2007), so rows of
    one patient are not treated as independent evidence. Groups of one row each give exactly
    the row bootstrap. Resamples where a metric is undefined are ignored.
    """
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    members: list[np.ndarray] | None = None
    if groups is not None:
        _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        order = np.argsort(first)  # groups in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        codes = rank[inverse.reshape(-1)]
        members = [np.flatnonzero(codes == g) for g in range(len(order))] if len(order) < n else None
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if members is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
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
    metric_fn: Callable[..., dict[str, float]],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for the pooled arrays (``groups``: see :func:`bootstrap_ci`);
    interval ends within :data:`RANGES`."""
    point = metric_fn(*arrays)
    ci = bootstrap_ci(metric_fn, *arrays, n_boot=n_boot, seed=seed, groups=groups)
    out = {}
    for k, v in point.items():
        if k in COUNTS:
            out[k] = {"value": int(v)}
            continue
        lo, hi = RANGES.get(k.split("_", 1)[0] if k.startswith("auroc_") else k, (-math.inf, math.inf))
        out[k] = {"value": v, "ci_low": _clip(ci[k][0], lo, hi), "ci_high": _clip(ci[k][1], lo, hi)}
    return out


def _clip(x: float, lo: float, hi: float) -> float:
    return x if math.isnan(x) else float(min(max(x, lo), hi))


def mean_std(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each metric across folds (NaNs ignored)."""
    keys = [k for k in per_fold[0] if k not in COUNTS]
    out = {}
    for k in keys:
        v = np.array([m[k] for m in per_fold], dtype=float)
        v = v[np.isfinite(v)]
        out[k] = {
            "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
        }
    return out
