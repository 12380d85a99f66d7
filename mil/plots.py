"""ROC, precision-recall and calibration plots of a predictions table."""

from __future__ import annotations

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


def plot_curves(
    predictions: pd.DataFrame, target: str, classes: list[str], out_dir: str | Path, title: str = ""
) -> list[Path]:
    """Write ``roc.png`` and ``pr.png``: one thin curve per fold and a bold pooled curve.

    Binary tasks use the last class as positive; multi-class tasks draw one pooled
    one-vs-rest curve per class.
    """
    out_dir = Path(out_dir)
    y_all = predictions[target].map({c: i for i, c in enumerate(classes)}).to_numpy()
    written = []
    for kind, xlabel, ylabel, name in (
        ("roc", "False positive rate", "True positive rate", "AUROC"),
        ("pr", "Recall", "Precision", "AP"),
    ):
        fig, ax = plt.subplots(figsize=(5, 5))
        if len(classes) == 2:
            positive = classes[-1]
            groups = predictions.groupby("fold", sort=True) if "fold" in predictions else []
            for fold, df in groups:
                y = (df[target] == positive).to_numpy()
                if 0 < y.sum() < len(y):
                    x, yy, value = _curves(y, df[f"prob_{positive}"].to_numpy(), kind)
                    ax.plot(x, yy, lw=0.8, alpha=0.45, label=f"fold {fold} ({name} {value:.3f})")
            y = y_all == 1
            x, yy, value = _curves(y, predictions[f"prob_{positive}"].to_numpy(), kind)
            ax.plot(x, yy, lw=2.2, color="black", label=f"pooled ({name} {value:.3f})")
            if kind == "pr":
                ax.axhline(y.mean(), ls=":", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
        else:
            for i, c in enumerate(classes):
                y = y_all == i
                if 0 < y.sum() < len(y):
                    x, yy, value = _curves(y, predictions[f"prob_{c}"].to_numpy(), kind)
                    ax.plot(x, yy, lw=1.8, label=f"{c} vs rest ({name} {value:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=title or target)
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
        path = out_dir / f"{kind}.png"
        _save(fig, path)
        written.append(path)
    return written


def plot_calibration(
    predictions: pd.DataFrame, target: str, classes: list[str], out_dir: str | Path, n_bins: int = 10
) -> Path | None:
    """Reliability diagram of the positive class (binary tasks only)."""
    if len(classes) != 2:
        return None
    y = (predictions[target] == classes[-1]).to_numpy()
    p = predictions[f"prob_{classes[-1]}"].to_numpy()
    frac, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.plot(mean_pred, frac, marker="o", color="black", label="model")
    ax.set(xlabel=f"Predicted P({classes[-1]})", ylabel="Observed fraction", xlim=(0, 1), ylim=(0, 1), title="Calibration")
    ax.legend(loc="upper left", fontsize=8)
    path = Path(out_dir) / "calibration.png"
    _save(fig, path)
    return path
