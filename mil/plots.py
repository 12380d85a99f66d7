"""Plots of a predictions table: ROC, precision-recall, calibration, confusion matrix,
regression scatter and Kaplan–Meier curves.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from mil.io import atomic_path


def _curves(y: np.ndarray, score: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, float]:
    if kind == "roc":
        fpr, tpr, _ = roc_curve(y, score)
        return fpr, tpr, auc(fpr, tpr)
    precision, recall, _ = precision_recall_curve(y, score)
    return recall, precision, average_precision_score(y, score)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    plt.close(fig)


def _interval(metrics: dict | None, name: str) -> str:
    m = (metrics or {}).get(name)
    if not m or "ci_low" not in m:
        return ""
    return f" [95% CI {m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def plot_curves(
    predictions: pd.DataFrame,
    target: str,
    classes: list[str],
    out_dir: str | Path,
    title: str = "",
    pooled_metrics: dict | None = None,
    n_patients: int | None = None,
    curve_label: str = "pooled",
) -> list[Path]:
    """Write ``roc.png`` and ``pr.png``: one thin curve per fold and a bold ``curve_label`` curve.

    Binary tasks use the last class as positive; multi-class tasks draw one pooled
    one-vs-rest curve per class. The title names the positive class and the numbers of bags
    (and patients); the legend gives the bootstrap 95% interval from ``pooled_metrics``
    (``metrics.json``'s ``pooled`` entry) when passed.
    """
    out_dir = Path(out_dir)
    y_all = predictions[target].map({c: i for i, c in enumerate(classes)}).to_numpy()
    counts = f"{len(predictions)} bags" + (f", {n_patients} patients" if n_patients is not None else "")
    written = []
    for kind, xlabel, ylabel, name, key in (
        ("roc", "False positive rate (1 - specificity)", "True positive rate (sensitivity)", "AUROC", "auroc"),
        ("pr", "Recall (sensitivity)", "Precision (PPV)", "AP", "ap"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        if len(classes) == 2:
            positive = classes[-1]
            heading = f"{target}: {positive} (positive) vs {classes[0]}; {counts}"
            groups = predictions.groupby("fold", sort=True) if "fold" in predictions else []
            for fold, df in groups:
                y = (df[target] == positive).to_numpy()
                if 0 < y.sum() < len(y):
                    x, yy, value = _curves(y, df[f"prob_{positive}"].to_numpy(), kind)
                    ax.plot(x, yy, lw=1.0, alpha=0.6, label=f"{fold} ({name} {value:.3f})")
            y = y_all == 1
            x, yy, value = _curves(y, predictions[f"prob_{positive}"].to_numpy(), kind)
            ax.plot(x, yy, lw=2.2, color="black", label=f"{curve_label} ({name} {value:.3f}{_interval(pooled_metrics, key)})")
            if kind == "pr":
                ax.axhline(y.mean(), ls=":", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
        else:
            heading = f"{target}: one-vs-rest per class; {counts}"
            for i, c in enumerate(classes):
                y = y_all == i
                if 0 < y.sum() < len(y):
                    x, yy, value = _curves(y, predictions[f"prob_{c}"].to_numpy(), kind)
                    ax.plot(x, yy, lw=1.8, label=f"{c} vs rest ({name} {value:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        ax.set_title(title or heading, fontsize=9)
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
        path = out_dir / f"{kind}.png"
        _save(fig, path)
        written.append(path)
    return written


def plot_calibration(
    predictions: pd.DataFrame, target: str, classes: list[str], out_dir: str | Path, n_bins: int = 10
) -> Path | None:
    """Reliability diagram of the positive class (binary tasks only), with the bags per bin below it."""
    if len(classes) != 2:
        return None
    y = (predictions[target] == classes[-1]).to_numpy()
    p = predictions[f"prob_{classes[-1]}"].to_numpy()
    frac, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.2), sharex=True, gridspec_kw={"height_ratios": [4, 1.3]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.plot(mean_pred, frac, marker="o", color="black", label=f"model (quantile bins of {len(p)} bags)")
    ax.set(ylabel="Observed fraction", xlim=(0, 1), ylim=(0, 1), title=f"Calibration: P({classes[-1]})")
    ax.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, n_bins + 1)
    hist.hist([p[~y], p[y]], bins=edges, stacked=True, color=["tab:blue", "tab:red"],
              label=[f"true {classes[0]}", f"true {classes[-1]}"])
    hist.set(xlabel=f"Predicted P({classes[-1]})", ylabel="bags")
    hist.legend(loc="upper center", fontsize=7, ncol=2)
    path = Path(out_dir) / "calibration.png"
    _save(fig, path)
    return path


def plot_confusion(
    y: np.ndarray, pred: np.ndarray, classes: list[str], path: str | Path, title: str = "", subtitle: str = ""
) -> Path:
    """Confusion matrix: counts in the cells, colour = fraction of the true class (row); ``subtitle``
    states the decision rule (e.g. the threshold)."""
    n = len(classes)
    counts = np.zeros((n, n), dtype=int)
    np.add.at(counts, (np.asarray(y, dtype=int), np.asarray(pred, dtype=int)), 1)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{counts[i, j]}\n{rows[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if rows[i, j] > 0.6 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted (called)", ylabel="True", title=title or "Confusion matrix")
    if subtitle:
        import textwrap

        fig.text(0.5, -0.02, "\n".join(textwrap.wrap(subtitle, 60)), ha="center", va="top", fontsize=7)
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_yticklabels(classes)
    path = Path(path)
    _save(fig, path)
    return path


def plot_scatter(predictions: pd.DataFrame, target: str, prediction: str, path: str | Path, title: str = "") -> Path:
    """Predicted against true values, one colour per fold, with the identity line."""
    fig, ax = plt.subplots(figsize=(5, 5))
    groups = predictions.groupby("fold", sort=True) if "fold" in predictions else [("all", predictions)]
    for fold, df in groups:
        ax.scatter(df[target], df[prediction], s=14, alpha=0.7, label=str(fold))
    both = np.concatenate([predictions[target].to_numpy(float), predictions[prediction].to_numpy(float)])
    lo, hi = np.nanmin(both), np.nanmax(both)
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    ax.set(xlabel=f"True {target}", ylabel=f"Predicted {target}", title=title or target)
    ax.legend(loc="upper left", fontsize=7)
    path = Path(path)
    _save(fig, path)
    return path


def plot_km(
    time: np.ndarray, event: np.ndarray, high: np.ndarray, p_value: float, path: str | Path, title: str = "", xlabel: str = "Time"
) -> Path:
    """Kaplan–Meier curves (with 95% bands) of the high- and low-risk groups, log-rank p in the title."""
    from scipy import stats

    time, event, high = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(high).astype(bool)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, group, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not group.any():
            continue
        data = stats.CensoredData(uncensored=time[group & event], right=time[group & ~event])
        sf = stats.ecdf(data).sf
        x = np.concatenate([[0.0], sf.quantiles])
        y = np.concatenate([[1.0], sf.probabilities])
        ax.step(x, y, where="post", color=color, lw=2, label=f"{name} (n={group.sum()}, {(group & event).sum()} events)")
        if len(sf.quantiles) > 1:
            with warnings.catch_warnings():  # undefined where the curve reaches 0; drawn as far as it exists
                warnings.simplefilter("ignore", RuntimeWarning)
                band = sf.confidence_interval(0.95)
            lo = np.concatenate([[1.0], band.low.evaluate(sf.quantiles)])
            hi = np.concatenate([[1.0], band.high.evaluate(sf.quantiles)])
            ax.fill_between(x, lo, hi, step="post", color=color, alpha=0.15, lw=0)
        censored = time[group & ~event]
        ax.plot(censored, sf.evaluate(censored), "|", color=color, ms=7)
    p_text = "n/a" if p_value != p_value else f"{p_value:.3g}"
    ax.set(xlabel=xlabel, ylabel="Survival probability", ylim=(0, 1.02), title=f"{title or 'Kaplan–Meier'} (log-rank p = {p_text})")
    ax.legend(loc="lower left", fontsize=8)
    path = Path(path)
    _save(fig, path)
    return path
