"""`cv.ablation=true`: does the slide add anything beyond the clinical covariates (and vice versa)?

On the same folds as the fused model of ``mil crossval`` (slide + ``cohort.covariates``) this trains

- ``slide_only``: the same aggregator and recipe without covariates;
- ``covariates_only``: a linear model of the encoded covariates (the fold's own
  :class:`~mil.covariates.CovariateEncoder`) fitted by full-batch L-BFGS on the training patients
  with the task's own loss (cross-entropy: logistic regression; Cox partial likelihood: a Cox
  model; least squares: linear regression) plus an L2 penalty of ``train.weight_decay``,

and reports the three side by side (``ablation`` in ``metrics.json``, a section of
``summary.md``, each arm's full report in ``ablation/<arm>/``), with a paired bootstrap over
patients of the difference of the primary metric (AUROC; c-index for survival; Pearson r for
regression; mean AUROC over targets for multi-target) between fused and each single source.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from mil.cohort import Cohort
from mil.covariates import encode_split, fit_fold
from mil.crossval import fold_frame, id_columns, is_main_process
from mil.fitting import MODEL_FILE, save_model
from mil.fusion import fit_covariates_only
from mil.io import atomic_path, write_json, write_text
from mil.metrics import binary_auroc, concordance_index, regression_metrics
from mil.report import pool_repeats, write_report
from mil.splits import Fold
from mil.tasks import Task

logger = logging.getLogger(__name__)

ARMS = ("slide_only", "covariates_only", "fused")
LABELS = {"slide_only": "slide only", "covariates_only": "covariates only", "fused": "slide + covariates"}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


@torch.no_grad()
def covariate_outputs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Raw outputs [n, n_outputs] of the covariates-only model (it reads no bag)."""
    return model(torch.zeros(len(x), 1, 1), None, covariates=x).logits.float().numpy()


def run_ablation_fold(
    cfg: DictConfig, cohort: Cohort, task: Task, fold: Fold, fold_dir: Path, seed: int, train_one: Callable
) -> None:
    """Train and predict the slide-only and covariates-only arms of one fold.

    Called whenever the fold itself is (re)computed, so the arms always match its data.

    ``train_one`` is :func:`mil.crossval` 's training of one model (the fused arm's own recipe).
    Runs on every process of a distributed run (training needs them all); only the main one writes.
    """
    test_bags = cohort.subset(set(fold.test))
    arm_dir = fold_dir / "ablation" / "slide_only"
    slide_cfg = cfg.copy()
    slide_cfg.cohort.covariates.numeric, slide_cfg.cohort.covariates.categorical = [], []
    logger.info("%s ablation: slide-only model", fold.name)
    trained = train_one(slide_cfg, cohort, task, fold.train, fold.val, arm_dir, seed, f"{fold.name} slide-only")
    if not is_main_process():
        return
    models = trained.save(arm_dir)
    columns = trained.predictions(slide_cfg, task, test_bags, [None] * len(trained.models))
    write_json(arm_dir / "summary.json", {**trained.summary, "models": models})
    _write_csv(fold_frame(cfg, task, fold, test_bags, columns), arm_dir / "predictions.csv")

    arm_dir = fold_dir / "ablation" / "covariates_only"
    logger.info("%s ablation: covariates-only linear model", fold.name)
    train_bags, val_bags = cohort.subset(set(fold.train)), cohort.subset(set(fold.val))
    covs = fit_fold(cohort.covariates, train_bags, val_bags, cfg.cohort.covariates.unseen_category, fold.name)
    x_test, _ = encode_split(covs.encoder, cohort.covariates, test_bags, f"{fold.name}, test")
    x_train = torch.from_numpy(covs.train)
    model = fit_covariates_only(task, x_train, task.encode(train_bags), cfg.train.weight_decay)
    if task.calibrates:  # e.g. survival: centre the risk on the training patients' median
        task.calibrate(model, covariate_outputs(model, x_train))
    save_model(arm_dir / MODEL_FILE, model, covs.encoder)
    outputs = covariate_outputs(model, torch.from_numpy(x_test))
    _write_csv(fold_frame(cfg, task, fold, test_bags, task.predictions(outputs)), arm_dir / "predictions.csv")


# ---------------------------------------------------------------- the comparison
Arrays = tuple[np.ndarray, ...]


def primary_metric(task: Task) -> tuple[str, Callable[[pd.DataFrame], Arrays], Callable[..., float]]:
    """The metric the ablation compares: its name, ``rows -> arrays`` and ``metric(*arrays) -> value``.

    Classification: AUROC (macro one-vs-rest over the classes present); multi-target: the mean of
    those over the targets; survival: Harrell's c-index; regression: Pearson r. NaN when undefined.
    """
    if task.name == "survival":
        time, event = task.cfg.task.time, task.cfg.task.event
        return ("c_index", lambda df: (df["risk"].to_numpy(float), df[time].to_numpy(float), df[event].to_numpy(float)),
                concordance_index)
    if task.name == "regression":
        target = task.columns[0].name
        return ("pearson", lambda df: (df[target].to_numpy(float), df[f"pred_{target}"].to_numpy(float)),
                lambda y, pred: regression_metrics(y, pred)["pearson"])
    prefix = {c.name: ("prob_" if task.name == "classification" else f"prob_{c.name}_") for c in task.columns}

    def arrays(df: pd.DataFrame) -> Arrays:
        out = []
        for c in task.columns:  # class index per row (-1: unlabelled), probabilities [n, K]
            index = {k: i for i, k in enumerate(c.classes or [])}
            out.append(df[c.name].map(lambda v, index=index: index.get(str(v), -1) if pd.notna(v) else -1).to_numpy(int))
            out.append(df[[f"{prefix[c.name]}{k}" for k in c.classes or []]].to_numpy(float))
        return tuple(out)

    def mean_auroc(*arrays: np.ndarray) -> float:
        values = []
        for y, probs in zip(arrays[::2], arrays[1::2], strict=True):
            keep = y >= 0
            y, probs = y[keep], probs[keep]
            if probs.shape[1] == 2:
                values.append(binary_auroc(y == 1, probs[:, 1]))
            else:
                per_class = [binary_auroc(y == k, probs[:, k]) for k in np.unique(y)]
                values.append(float(np.nanmean(per_class)) if len(per_class) > 1 else math.nan)
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    return ("auroc" if task.name == "classification" else "mean_auroc"), arrays, mean_auroc


def paired_bootstrap(
    arrays: dict[str, Arrays], patients: np.ndarray, metric: Callable[..., float], n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """The metric of every arm on ``n_boot`` resamples of patients (the same resamples for every arm).

    ``arrays`` hold the same bags in the same row order for every arm; ``patients`` [n_rows] their
    patient ids. Returns ``arm -> [n_boot]`` (NaN where undefined).
    """
    ids, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
    rng = np.random.default_rng(seed)
    out = {arm: np.empty(n_boot) for arm in arrays}
    for b in range(n_boot):
        drawn = rng.integers(0, len(ids), len(ids))
        pick = np.concatenate([order[starts[i]:starts[i + 1]] for i in drawn])
        for arm, a in arrays.items():
            out[arm][b] = metric(*(x[pick] for x in a))
    return out


def _interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    return (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if len(v) else (math.nan, math.nan)


def compare_arms(
    frames: dict[str, pd.DataFrame], task: Task, patient_column: str, n_boot: int, seed: int
) -> dict[str, Any]:
    """Per-arm pooled metric with 95% patient-bootstrap intervals, per-fold mean ± std, and the paired differences."""
    name, to_arrays, fn = primary_metric(task)
    arrays = {arm: to_arrays(df) for arm, df in frames.items()}
    patients = frames["fused"][patient_column].astype(str).to_numpy()
    boot = paired_bootstrap(arrays, patients, fn, n_boot, seed)

    def metric(df: pd.DataFrame) -> float:
        return fn(*to_arrays(df))

    result: dict[str, Any] = {"metric": name, "n_bootstrap": n_boot, "n_patients": int(frames["fused"][patient_column].nunique()),
                              "arms": {}, "differences": {}}
    for arm, df in frames.items():
        per_fold = [metric(rows) for _, rows in df.groupby("fold", sort=True)] if "fold" in df else []
        finite = np.array([v for v in per_fold if np.isfinite(v)])
        low, high = _interval(boot[arm])
        result["arms"][arm] = {
            "value": metric(df), "ci_low": low, "ci_high": high,
            "fold_mean": float(finite.mean()) if len(finite) else math.nan,
            "fold_std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
        }
    for other in ("covariates_only", "slide_only"):
        d = boot["fused"] - boot[other]
        finite = d[np.isfinite(d)]
        low, high = _interval(d)
        p = min(1.0, 2 * min(float((finite <= 0).mean()), float((finite >= 0).mean()))) if len(finite) else math.nan
        result["differences"][f"fused_minus_{other}"] = {
            "value": result["arms"]["fused"]["value"] - result["arms"][other]["value"],
            "ci_low": low, "ci_high": high, "p_bootstrap": p,
        }
    return result


def _f(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def format_ablation(result: dict[str, Any]) -> str:
    """The markdown section appended to ``summary.md``."""
    m = result["metric"]
    lines = [
        "", "## Ablation: slide, covariates, both", "",
        f"Same folds and patients ({result['n_patients']}); pooled out-of-fold {m} with 95% intervals from "
        f"{result['n_bootstrap']} bootstrap resamples of patients.", "",
        f"| model | pooled {m} [95% CI] | mean ± std across folds |", "|---|---|---|",
    ]
    for arm in ARMS:
        a = result["arms"][arm]
        lines.append(f"| {LABELS[arm]} | {_f(a['value'])} [{_f(a['ci_low'])}, {_f(a['ci_high'])}] | "
                     f"{_f(a['fold_mean'])} ± {_f(a['fold_std'])} |")
    lines += ["", f"Paired bootstrap over patients of the difference in {m}:", "",
              "| comparison | difference [95% CI] | two-sided bootstrap p |", "|---|---|---|"]
    for key, d in result["differences"].items():
        other = LABELS[key.removeprefix("fused_minus_")]
        p = d["p_bootstrap"]
        lines.append(f"| slide + covariates − {other} | {_f(d['value'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}] | "
                     f"{'n/a' if not np.isfinite(p) else f'{p:.3g}'} |")
    lines += ["", "An interval of the difference that excludes 0 means the fused model is better (above 0) or worse "
              "(below 0) than that single source on these patients; each arm's full report is in `ablation/<arm>/`."]
    return "\n".join(lines) + "\n"


def report_ablation(cfg: DictConfig, task: Task, out: Path, folds: list[Fold], fused: pd.DataFrame) -> dict[str, Any]:
    """Pool each arm's fold predictions, write their reports and the side-by-side comparison."""
    ids = id_columns(cfg)
    dtypes = {**{c: str for c in ids}, **task.csv_dtypes()}
    frames = {}
    for arm in ("slide_only", "covariates_only"):
        df = pd.concat([pd.read_csv(out / f.name / "ablation" / arm / "predictions.csv", dtype=dtypes) for f in folds],
                       ignore_index=True)
        _write_csv(df, out / "ablation" / arm / "predictions.csv")
        write_report(df, task.columns[0].name, list(task.columns[0].classes or []), out / "ablation" / arm, ids,
                     n_boot=cfg.cv.bootstrap, seed=cfg.cv.seed, task=task)
        frames[arm] = df
    frames["fused"] = fused
    outputs = task.prediction_names
    keys = ids + [k for k in ("fold", "repeat") if k in fused]
    for arm, df in frames.items():  # same bags, same order in every arm; repeats averaged per bag
        df = df.sort_values(keys, kind="stable").reset_index(drop=True)
        pooled = pool_repeats(df, ids, task.truth_names, outputs)
        if "fold" not in pooled:  # repeats pooled: per-fold rows are gone, keep the first repeat's folds
            pooled = pooled.merge(df[df["repeat"] == df["repeat"].min()][[*ids, "fold"]], on=ids, how="left")
        frames[arm] = pooled.sort_values(ids, kind="stable").reset_index(drop=True)
    result = compare_arms(frames, task, cfg.cohort.patient_column, cfg.cv.bootstrap, cfg.cv.seed)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    write_json(metrics_path, {**metrics, "ablation": result})
    summary = out / "summary.md"
    write_text(summary, (summary.read_text() if summary.is_file() else "") + format_ablation(result))
    d = result["differences"]["fused_minus_covariates_only"]
    logger.info("ablation (%s): fused %.3f, slide only %.3f, covariates only %.3f; fused - covariates only %.3f [%.3f, %.3f]",
                result["metric"], result["arms"]["fused"]["value"], result["arms"]["slide_only"]["value"],
                result["arms"]["covariates_only"]["value"], d["value"], d["ci_low"], d["ci_high"])
    return result
