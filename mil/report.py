"""Metrics files and plots for any predictions table (cross-validation or external cohort).

Every task reports the same way: metrics per test fold (when a ``fold`` column exists) with
mean ± std across folds, and metrics of the pooled predictions with percentile-bootstrap 95%
intervals, in ``metrics.json`` and ``summary.md``, plus the task's plots. Classification is
written here; other tasks' reports (in :mod:`mil.tasks`) reuse :func:`evaluate` and
:func:`format_summary`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning

from mil.io import write_json, write_text
from mil.metrics import COUNTS, classification_metrics, mean_std, with_intervals
from mil.plots import plot_calibration, plot_confusion, plot_curves
from mil.tables import ONLY_EMPTY_IS_MISSING

logger = logging.getLogger(__name__)


def pool_repeats(df: pd.DataFrame, id_columns: list[str], truth: list[str], outputs: list[str]) -> pd.DataFrame:
    """One row per bag: predictions averaged over repeated cross-validations."""
    if "repeat" not in df or df["repeat"].nunique() <= 1:
        return df
    agg = {**{t: "first" for t in truth}, **{o: "mean" for o in outputs}}
    calls = [c for c in df.columns if c.startswith("pred_") and c not in agg]  # a class call: the repeats' majority
    agg.update({c: _majority for c in calls})
    return df.groupby(id_columns, sort=False).agg(agg).reset_index()


def _majority(values: pd.Series) -> Any:
    return values.mode().iloc[0]


def evaluate(
    predictions: pd.DataFrame,
    id_columns: list[str],
    truth: list[str],
    outputs: list[str],
    metric_fn: Callable[..., dict[str, float]],
    arrays: Callable[[pd.DataFrame], tuple[np.ndarray, ...]],
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``{"folds", "across_folds", "pooled"}`` of ``metric_fn(*arrays(rows))``, and the pooled rows.

    The first of ``id_columns`` is the patient: when a patient has several rows (slide-level
    bags), the bootstrap resamples patients, not rows.
    """
    result: dict[str, Any] = {}
    if "fold" in predictions:
        folds = {str(f): metric_fn(*arrays(df)) for f, df in predictions.groupby("fold", sort=True)}
        result["folds"] = folds
        result["across_folds"] = mean_std(list(folds.values()))
    pooled = pool_repeats(predictions, id_columns, truth, outputs)
    groups = pooled[id_columns[0]].to_numpy() if id_columns and id_columns[0] in pooled else None
    if groups is not None and pd.Series(groups).is_unique:
        groups = None
    elif groups is not None:
        logger.info("bootstrap over %d patients (clusters of %d rows)", pd.Series(groups).nunique(), len(groups))
    result["pooled"] = with_intervals(metric_fn, *arrays(pooled), n_boot=n_boot, seed=seed, groups=groups)
    return result, pooled


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_summary(result: dict[str, Any], title: str | None = None) -> str:
    """A markdown table of the pooled metrics (with intervals) and the per-fold metrics."""
    title = title or f"{result['target']} ({' / '.join(result['classes'])})"
    pooled = result["pooled"]
    names = [k for k in pooled if k not in COUNTS and "ci_low" in pooled[k]]
    extra = [k for k in pooled if k not in COUNTS and k not in names]  # single values, e.g. a log-rank p
    counts = ", ".join(f"{int(pooled[k]['value'])} {'events' if k == 'n_events' else 'bags'}" for k in COUNTS if k in pooled)
    lines = [f"# {title}", "", f"Pooled over {counts}, 95% bootstrap intervals ({result['n_bootstrap']} resamples):", ""]
    folds = "across_folds" in result
    lines += ["| metric | pooled [95% CI] |" + (" mean ± std across folds |" if folds else ""), "|---|---|" + ("---|" if folds else "")]
    for m in names:
        p = pooled[m]
        row = f"| {m} | {_fmt(p['value'])} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] |"
        if folds:
            a = result["across_folds"][m]
            row += f" {_fmt(a['mean'])} ± {_fmt(a['std'])} |"
        lines.append(row)
    for m in extra:  # shown to 3 significant digits: p-values can be tiny
        value = pooled[m]["value"]
        lines.append(f"| {m} | {'n/a' if value is None or math.isnan(value) else f'{value:.3g}'} |" + (" |" if folds else ""))
    if "folds" in result:
        lines += ["", "| fold | n | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for fold, m in result["folds"].items():
            lines.append(f"| {fold} | {int(m['n'])} | " + " | ".join(_fmt(m.get(k)) for k in names) + " |")
    return "\n".join(lines) + "\n"


def _class_arrays(df: pd.DataFrame, target: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true class index [n], probabilities [n, C], called class index [n]: ``pred_<target>``, else the argmax)."""
    index = {c: i for i, c in enumerate(classes)}
    y = df[target].astype(str).map(index)
    if y.isna().any():
        bad = df.loc[y.isna(), target].iloc[0]
        raise ValueError(f"label {bad!r} in column {target!r} is not one of the classes {classes}")
    probs = df[[f"prob_{c}" for c in classes]].to_numpy()
    call_column = f"pred_{target}"
    if call_column in df:
        calls = df[call_column].map(lambda v: index.get(str(v)) if pd.notna(v) else np.nan)  # none: the argmax
        bad = calls.isna() & df[call_column].notna()  # a call outside the classes
        if bad.any():
            raise ValueError(f"call {df.loc[bad, call_column].iloc[0]!r} in column {call_column!r} is not one of the "
                             f"classes {classes}")
        calls = np.where(calls.isna(), probs.argmax(axis=1), calls.fillna(0)).astype(int)
    else:
        calls = probs.argmax(axis=1)
    return y.to_numpy().astype(int), probs, calls


def decision_text(thresholds: dict | None, classes: list[str], target: str) -> str:
    """How a bag's call is made, for summaries and plot titles."""
    if len(classes) != 2:
        return f"call: the most probable class (argmax over {len(classes)} classes)"
    if not thresholds or thresholds.get("ensemble") is None:
        return f"call: {classes[-1]} when P({classes[-1]}) >= 0.5 (argmax; no threshold recorded)"
    models = thresholds.get("models") or {}
    rule = thresholds.get("describe", thresholds.get("rule", ""))
    if len(models) > 1:
        values = ", ".join(f"{v:.3f}" for v in models.values())
        return (f"call: {classes[-1]} when P({classes[-1]}) >= the fold's threshold ({rule}; per fold {values}; "
                f"fold ensemble {thresholds['ensemble']:.3f}, {thresholds.get('ensemble_rule', '')})")
    return f"call: {classes[-1]} when P({classes[-1]}) >= {thresholds['ensemble']:.3f} ({rule})"


def classification_report(
    predictions: pd.DataFrame,
    target: str,
    classes: list[str],
    out_dir: str | Path,
    id_columns: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    thresholds: dict | None = None,
    curve_label: str = "pooled",
) -> dict[str, Any]:
    """``metrics.json``, ``summary.md``, ``roc.png``, ``pr.png``, ``confusion.png`` (+ ``calibration.png`` if binary).

    Balanced accuracy, accuracy, F1, sensitivity and specificity score the ``pred_<target>``
    calls when the table has them (else the argmax); ``thresholds`` (the ``run.yaml`` record of
    :func:`mil.thresholds.threshold_record`) is stated in ``summary.md`` and the confusion matrix.
    ``curve_label`` names the bold curve ("pooled" out-of-fold predictions, or "fold ensemble").
    """
    out_dir = Path(out_dir)
    labelled = predictions[predictions[target].notna()]
    probs = [f"prob_{c}" for c in classes]
    metric_fn = partial(classification_metrics, classes=classes)
    result: dict[str, Any] = {"task": "classification", "target": target, "classes": classes, "n_bootstrap": n_boot}
    found, pooled = evaluate(labelled, id_columns, [target], probs, metric_fn,
                             lambda df: _class_arrays(df, target, classes), n_boot, seed)
    result.update(found)
    decision = decision_text(thresholds, classes, target)
    result["decision"] = {"text": decision, **({"thresholds": thresholds} if thresholds else {})}
    write_json(out_dir / "metrics.json", result)
    present = sorted({str(v) for v in labelled[target]})
    one_class = ""
    if len(present) < 2 and len(labelled):
        one_class = (f"Every one of the {len(labelled)} labelled bags is {target} = {present[0]!r}: AUROC and AP are "
                     "undefined (NaN) and balanced accuracy is that class's recall alone. Discrimination needs a "
                     "cohort with both classes.")
        logger.warning("%s", one_class)
    write_text(out_dir / "summary.md", format_summary(result) + f"\n{decision}\n" + (f"\n{one_class}\n" if one_class else ""))
    n_patients = pooled[id_columns[0]].nunique() if id_columns and id_columns[0] in pooled else None
    with warnings.catch_warnings():
        if one_class:  # said once above; scikit-learn's curve warnings would only repeat it
            warnings.simplefilter("ignore", UndefinedMetricWarning)
        plot_curves(pooled if "repeat" in labelled and labelled["repeat"].nunique() > 1 else labelled, target, classes,
                    out_dir, pooled_metrics=result["pooled"], n_patients=n_patients, curve_label=curve_label)
        plot_calibration(pooled, target, classes, out_dir)
    y, _, calls = _class_arrays(pooled, target, classes)
    plot_confusion(y, calls, classes, out_dir / "confusion.png", title=target, subtitle=decision)
    return result


def write_report(
    predictions: pd.DataFrame,
    target: str,
    classes: list[str],
    out_dir: str | Path,
    id_columns: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    task: Any = None,
) -> dict[str, Any]:
    """Write the metrics files and plots of ``predictions``.

    Without ``task`` the table is a single-label classification of ``target`` over
    ``classes``; with a :class:`mil.tasks.Task`, that task's report is written. A table
    without labels gets a ``summary.md`` of its predictions only (see :func:`unlabelled_summary`).
    """
    labelled = task.labelled(predictions) if task is not None else int(predictions[target].notna().sum()) \
        if target in predictions else 0
    if not labelled:
        names = task.truth_names if task is not None else [target]
        outputs = task.prediction_names if task is not None else [f"prob_{c}" for c in classes]
        return unlabelled_summary(predictions, names, [c for c in outputs if c in predictions], Path(out_dir))
    if task is None:
        return classification_report(predictions, target, classes, out_dir, id_columns, n_boot, seed)
    return task.report(predictions, Path(out_dir), id_columns, n_boot, seed)


def unlabelled_summary(predictions: pd.DataFrame, truth: list[str], outputs: list[str], out_dir: Path) -> dict[str, Any]:
    """``summary.md`` for predictions without labels: counts and the distribution of each prediction.

    A ``metrics.json`` left in ``out_dir`` by an earlier, labelled report is removed: it would
    describe other data.
    """
    logger.warning("no labels (%s) in the predictions: nothing to score; writing a summary of the %d predictions",
                   ", ".join(truth), len(predictions))
    stale = out_dir / "metrics.json"
    if stale.is_file():
        stale.unlink()
        logger.warning("removed %s: it scored other, labelled predictions", stale)
    lines = [f"# Predictions without labels ({', '.join(truth)})", "",
             f"{len(predictions)} bags predicted; no labels, so no metrics.", ""]
    probs = [c for c in outputs if c.startswith("prob_")]
    if probs:
        predicted = predictions[probs].to_numpy().argmax(axis=1)
        lines += ["| predicted class | bags |", "|---|---|"]
        lines += [f"| {c[len('prob_'):]} | {int((predicted == i).sum())} |" for i, c in enumerate(probs)]
        lines.append("")
    if outputs:
        lines += ["| column | mean | std | min | median | max |", "|---|---|---|---|---|---|"]
        for c in outputs:
            v = predictions[c].astype(float)
            lines.append(f"| {c} | {_fmt(v.mean())} | {_fmt(v.std())} | {_fmt(v.min())} | {_fmt(v.median())} | {_fmt(v.max())} |")
    write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    return {"n": len(predictions), "n_labelled": 0}


def report_predictions(
    source: str | Path, target: str | None = None, classes: list[str] | None = None, out_dir: str | Path | None = None
) -> Path:
    """`mil report`: metrics and plots for a predictions CSV or a run folder holding one.

    The task (type, label columns, class order) and the bootstrap settings come from the
    run's ``run.yaml`` when the CSV sits in a run folder; otherwise the table is read as a classification of
    ``target`` (or a regression when it has a ``pred_<target>`` column and no ``prob_*`` columns).
    """
    from omegaconf import OmegaConf

    from mil.cohort import LabelColumn
    from mil.tasks import TASKS, task_from_meta

    source = Path(source)
    csv = source / "predictions.csv" if source.is_dir() else source
    if not csv.is_file():
        raise FileNotFoundError(f"no predictions file at {csv}")
    meta_path = csv.parent / "run.yaml"
    meta = OmegaConf.load(meta_path) if meta_path.is_file() else None
    target = target or (meta.target if meta is not None else None)
    if not target:
        raise ValueError(f"{csv}: pass --target (no run.yaml beside it names the label column)")
    header = pd.read_csv(csv, nrows=0).columns
    if meta is not None and "columns" in meta and target == meta.target:
        task = task_from_meta(meta)
        if classes and task.name == "classification":
            task = TASKS.get("classification")([LabelColumn(target, classes=list(classes))])
    elif f"pred_{target}" in header and not any(c.startswith("prob_") for c in header):
        task = TASKS.get("regression")([LabelColumn(target, "number")])
    else:
        prob_classes = [c[len("prob_"):] for c in header if c.startswith("prob_")]
        found = list(classes or (list(meta.classes) if meta is not None and target == meta.target else prob_classes))
        if not found:
            raise ValueError(
                f"{csv} has no prob_<class> columns and no pred_{target} column, so its task is unknown "
                f"(columns are {list(header)}). `mil report` reads the predictions `mil crossval` / `mil predict` "
                f"write: one prob_<class> column per class (e.g. prob_MSS, prob_MSI-H) beside the label column "
                f"{target!r}, or pred_{target} for a regression. Rename another tool's score columns to match"
            )
        task = TASKS.get("classification")([LabelColumn(target, classes=[str(c) for c in found])])
    missing = [c for c in task.truth_names + task.prediction_names if c not in header]
    if missing:
        raise ValueError(f"{csv} has no column(s) {missing} for the {task.name} task; columns are {list(header)}")
    outputs = task.truth_names + task.prediction_names
    calls = {f"pred_{c.name}" for c in task.columns}
    ids = [c for c in header
           if c not in (*outputs, *calls, "fold", "repeat") and not any(c.endswith(f".{p}") for p in task.prediction_names)]
    df = pd.read_csv(csv, dtype={**task.csv_dtypes(), **{c: str for c in ids}}, **ONLY_EMPTY_IS_MISSING)
    out = Path(out_dir) if out_dir else csv.parent
    boot = meta.get("bootstrap", {}) if meta is not None else {}
    write_report(df, target, task.columns[0].classes or [], out, ids,
                 n_boot=int(boot.get("n", 1000)), seed=int(boot.get("seed", 0)), task=task)
    return out
