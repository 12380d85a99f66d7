"""Metrics files and plots for any predictions table (cross-validation or external cohort)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.io import write_json, write_text
from mil.metrics import CLASSIFICATION_METRICS, classification_metrics, mean_std, with_intervals
from mil.plots import plot_calibration, plot_curves

logger = logging.getLogger(__name__)


def _arrays(df: pd.DataFrame, target: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    y = df[target].astype(str).map(index)
    if y.isna().any():
        bad = df.loc[y.isna(), target].iloc[0]
        raise ValueError(f"label {bad!r} in column {target!r} is not one of the classes {classes}")
    return y.to_numpy().astype(int), df[[f"prob_{c}" for c in classes]].to_numpy()


def pool_repeats(df: pd.DataFrame, id_columns: list[str], target: str, classes: list[str]) -> pd.DataFrame:
    """One row per bag: probabilities averaged over repeated cross-validations."""
    if "repeat" not in df or df["repeat"].nunique() <= 1:
        return df
    probs = [f"prob_{c}" for c in classes]
    return df.groupby(id_columns, sort=False).agg({target: "first", **{p: "mean" for p in probs}}).reset_index()


def write_report(
    predictions: pd.DataFrame,
    target: str,
    classes: list[str],
    out_dir: str | Path,
    id_columns: list[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``summary.md``, ``roc.png``, ``pr.png`` and ``calibration.png``.

    Per-fold metrics (when a ``fold`` column exists) with mean ± std, and the pooled
    predictions' metrics with percentile-bootstrap 95% intervals.
    """
    out_dir = Path(out_dir)
    labelled = predictions[predictions[target].notna()]
    result: dict[str, Any] = {"target": target, "classes": classes, "n_bootstrap": n_boot}
    if "fold" in labelled:
        folds = {}
        for fold, df in labelled.groupby("fold", sort=True):
            folds[str(fold)] = classification_metrics(*_arrays(df, target, classes))
        result["folds"] = folds
        result["across_folds"] = mean_std(list(folds.values()))
    pooled = pool_repeats(labelled, id_columns, target, classes)
    result["pooled"] = with_intervals(classification_metrics, *_arrays(pooled, target, classes), n_boot=n_boot, seed=seed)
    write_json(out_dir / "metrics.json", result)
    write_text(out_dir / "summary.md", format_summary(result))
    plot_curves(pooled if "repeat" in labelled and labelled["repeat"].nunique() > 1 else labelled, target, classes, out_dir)
    plot_calibration(pooled, target, classes, out_dir)
    return result


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_summary(result: dict[str, Any]) -> str:
    """A markdown table of the headline metrics."""
    lines = [f"# {result['target']} ({' / '.join(result['classes'])})", ""]
    pooled = result["pooled"]
    lines += [f"Pooled over {int(pooled['n']['value'])} bags, 95% bootstrap intervals ({result['n_bootstrap']} resamples):", ""]
    header = "| metric | pooled [95% CI] |" + (" mean ± std across folds |" if "across_folds" in result else "")
    lines += [header, "|---|---|" + ("---|" if "across_folds" in result else "")]
    for m in CLASSIFICATION_METRICS:
        p = pooled[m]
        row = f"| {m} | {_fmt(p['value'])} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] |"
        if "across_folds" in result:
            a = result["across_folds"][m]
            row += f" {_fmt(a['mean'])} ± {_fmt(a['std'])} |"
        lines.append(row)
    if "folds" in result:
        lines += ["", "| fold | n | " + " | ".join(CLASSIFICATION_METRICS) + " |", "|---" * (len(CLASSIFICATION_METRICS) + 2) + "|"]
        for fold, m in result["folds"].items():
            lines.append(f"| {fold} | {int(m['n'])} | " + " | ".join(_fmt(m[k]) for k in CLASSIFICATION_METRICS) + " |")
    return "\n".join(lines) + "\n"


def report_predictions(
    source: str | Path, target: str | None = None, classes: list[str] | None = None, out_dir: str | Path | None = None
) -> Path:
    """`mil report`: metrics and plots for a predictions CSV or a run folder holding one.

    Target and class order come from the run's ``run.yaml`` when the CSV sits in a run folder.
    """
    from omegaconf import OmegaConf

    source = Path(source)
    csv = source / "predictions.csv" if source.is_dir() else source
    if not csv.is_file():
        raise FileNotFoundError(f"no predictions file at {csv}")
    meta_path = csv.parent / "run.yaml"
    meta = OmegaConf.load(meta_path) if meta_path.is_file() else None
    target = target or (meta.target if meta is not None else None)
    if not target:
        raise ValueError(f"{csv}: pass --target (no run.yaml beside it names the label column)")
    df = pd.read_csv(csv, dtype={target: str})
    if target not in df:
        raise ValueError(f"{csv} has no label column {target!r}; columns are {list(df.columns)}")
    prob_classes = [c[len("prob_"):] for c in df.columns if c.startswith("prob_")]
    classes = list(classes or (list(meta.classes) if meta is not None else prob_classes))
    missing = [c for c in classes if f"prob_{c}" not in df]
    if missing:
        raise ValueError(f"{csv} has no probability column for class(es) {missing}")
    ids = [c for c in df.columns if c not in (target, "fold", "repeat") and "prob_" not in c]
    out = Path(out_dir) if out_dir else csv.parent
    write_report(df, target, classes, out, ids)
    return out
