"""Each task type end to end on a planted-signal cohort: cross-validation, `mil predict`, `mil report`.

The cohorts (``mil.tasks.synthetic``) plant a signal whose strength sets the label, so each
task must train to a clearly better-than-chance score: AUROC >= 0.85, Pearson >= 0.7, c-index >= 0.7.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import mil.crossval
from mil.cohort import load_cohort
from mil.config import load_config
from mil.crossval import load_run_model, run_crossval
from mil.fitting import model_files
from mil.inference import predict_outputs
from mil.predict import run_predict
from mil.report import report_predictions
from mil.splits import inner_folds, load_splits
from mil.tasks import task_class

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
FAST = ["model.args={hidden_dim: 32}", "train.min_steps=0", "cv.folds=3", "cv.bootstrap=100", "train.min_epochs=1", "train.batch_size=8",
        "train.bag_size=32", "train.lr=3e-3", "train.precision=32-true", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.logger=none"]
SETUPS = {  # the shipped example config, made fast; synthetic cohort kind, patients and options
    "classification": ("grade_multiclass.yaml", "grade", 60, {}, ["train.max_epochs=20"]),
    "multi_target": ("biomarkers_multi_target.yaml", "biomarkers", 90, {"missing": 0.2}, ["train.max_epochs=30"]),
    "regression": ("tmb_regression.yaml", "tmb", 90, {}, ["train.max_epochs=40"]),
    "survival": ("survival.yaml", "survival", 120, {}, ["train.batch_size=16", "train.max_epochs=60", "train.patience=20"]),
}


def _cohort(c):
    return [f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}", f"cohort.features_dir={c.features_dir}"]


@pytest.fixture(scope="module", params=list(SETUPS))
def run(request, tmp_path_factory, make_task_cohort):
    """A finished cross-validation of one task type, and an external cohort of the same kind."""
    example, kind, n, options, overrides = SETUPS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    cohort = make_task_cohort(tmp / "cohort", kind, n, seed=0, **options)
    external = make_task_cohort(tmp / "external", kind, 40, seed=7, prefix="X", **options)
    cfg = load_config([str(EXAMPLES / example), *_cohort(cohort), *FAST, *overrides, f"output_dir={tmp / 'cv'}"])
    assert cfg.task.type == request.param
    out = run_crossval(cfg)
    return request.param, cfg, out, external


def _score(task: str, metrics: dict) -> dict[str, float]:
    if task == "multi_target":
        return {name: r["pooled"]["auroc"]["value"] for name, r in metrics["targets"].items()}
    key = {"classification": "auroc", "regression": "pearson", "survival": "c_index"}[task]
    return {key: metrics["pooled"][key]["value"]}


def _harrell_c(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C from its definition, pair by pair (ties in risk count 1/2)."""
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def _reference_score(task: str, pred: pd.DataFrame) -> dict[str, float]:
    """The headline pooled metric of :func:`_score`, computed with scikit-learn / scipy / by hand."""
    from scipy.stats import pearsonr
    from sklearn.metrics import roc_auc_score

    if task == "classification":
        probs = pred[["prob_G1", "prob_G2", "prob_G3"]].to_numpy()
        return {"auroc": roc_auc_score(pred.grade, probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro",
                                       labels=["G1", "G2", "G3"])}
    if task == "multi_target":
        positive = {"MSI": "MSI-H", "BRAF": "mutant", "KRAS": "mutant"}
        return {t: roc_auc_score(pred[t].dropna() == p, pred.loc[pred[t].notna(), f"prob_{t}_{p}"])
                for t, p in positive.items()}
    if task == "regression":
        return {"pearson": pearsonr(pred.TMB, pred.pred_TMB).statistic}
    return {"c_index": _harrell_c(pred.risk.to_numpy(), pred.OS_months.to_numpy(), pred.OS_event.to_numpy())}


THRESHOLDS = {"classification": 0.85, "multi_target": 0.85, "regression": 0.7, "survival": 0.7}


def test_planted_signal_is_learned(run):
    task, _cfg, out, _ = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task
    scores = _score(task, metrics)
    assert min(scores.values()) >= THRESHOLDS[task], scores
    if task == "classification":  # multi-class: macro one-vs-rest AUROC and per-class AUROC
        assert {"auroc_G1", "auroc_G2", "auroc_G3", "balanced_accuracy", "accuracy"} <= set(metrics["pooled"])
    if task == "survival":  # the median split of the training folds separates the curves
        assert metrics["pooled"]["logrank_p"]["value"] < 0.01
    if task == "regression":
        assert {"spearman", "mae", "r2"} <= set(metrics["pooled"])
        p = metrics["pooled"]["pearson"]
        assert p["ci_low"] <= p["value"] <= p["ci_high"]


def test_outputs_per_task(run):
    task, cfg, out, _ = run
    pred = pd.read_csv(out / "predictions.csv")
    expected = {
        "classification": ["patient_id", "fold", "grade", "prob_G1", "prob_G2", "prob_G3", "pred_grade"],
        "multi_target": ["patient_id", "fold", "MSI", "BRAF", "KRAS", "prob_MSI_MSS", "prob_MSI_MSI-H",
                         "prob_BRAF_wild-type", "prob_BRAF_mutant", "prob_KRAS_wild-type", "prob_KRAS_mutant"],
        "regression": ["patient_id", "fold", "TMB", "pred_TMB"],
        "survival": ["patient_id", "fold", "OS_months", "OS_event", "risk"],
    }[task]
    assert list(pred.columns) == expected and pred.patient_id.is_unique
    plots = {"classification": ["roc.png", "pr.png", "confusion.png"], "regression": ["scatter.png"], "survival": ["km.png"],
             "multi_target": [f"{t}/{p}" for t in ("MSI", "BRAF", "KRAS") for p in ("roc.png", "confusion.png", "metrics.json")]}
    for name in ["summary.md", "metrics.json", *plots[task]]:
        assert (out / name).is_file(), name
    meta = OmegaConf.load(out / "run.yaml")
    assert meta.task == task
    cohort = load_cohort(cfg.cohort, columns=task_class(cfg).label_columns(cfg))
    folds = load_splits(out / "splits.yaml", set(cohort.patient_ids.tolist()))
    if task == "multi_target":  # partially labelled patients are trained on and predicted
        assert pred.BRAF.isna().sum() > 5 and pred[["MSI", "BRAF", "KRAS"]].notna().any(axis=1).all()
        for f in folds:  # stratified on the first target
            assert set(pred[pred.fold == f.name].MSI) == {"MSS", "MSI-H"}
    if task == "survival":
        rate = pred.OS_event.mean()
        for f in folds:  # stratified on the event: every test fold has the cohort's event rate
            assert abs(pred[pred.fold == f.name].OS_event.mean() - rate) < 0.03
        fold = folds[0]  # risk is centred on the median of each inner model's own training bags
        dev = cohort.subset(set(fold.train) | set(fold.val))
        strata, names = task_class(cfg)(cohort.columns, cfg).strata(dev)
        parts = inner_folds(np.array([b.patient_id for b in dev]), strata, names, 3, cfg.train.seed, "fold_0")
        models = model_files(out / fold.name)
        assert list(models) == ["inner_0", "inner_1", "inner_2"]
        for (trained_on, _), path in zip(parts, models.values(), strict=True):
            train_risk = predict_outputs(load_run_model(out, path), cohort.subset(set(trained_on)))[:, 0]
            assert abs(np.median(train_risk)) < 1e-4


def test_predict_and_report(run, tmp_path):
    task, _cfg, out, external = run
    ext = run_predict(out, [*_cohort(external), f"output_dir={tmp_path / 'ext'}"])
    pred = pd.read_csv(ext / "predictions.csv")
    own = pd.read_csv(out / "predictions.csv", nrows=0).columns.drop("fold")
    # Each fold model's own prediction columns (a classification call pred_<target> is the ensemble's only).
    outputs = [c for c in own if c.startswith(("prob_", "risk")) or (task == "regression" and c.startswith("pred_"))]
    models = [f"fold_{k}.inner_{j}" for k in range(3) for j in range(3)]  # 3 folds x 3 averaged inner models
    per_model = [f"{m}.{c}" for m in models for c in outputs]
    assert list(pred.columns) == [*own, *per_model] and len(pred) == 40
    first = next(c for c in own if c.startswith(("prob_", "pred_", "risk")))
    np.testing.assert_allclose(pred[first], pred[[f"{m}.{first}" for m in models]].mean(axis=1), rtol=1e-6)
    scores = _score(task, json.loads((ext / "metrics.json").read_text()))
    assert min(scores.values()) >= THRESHOLDS[task] - 0.1, scores  # the signal transfers to new patients
    if task == "regression":  # in the target's units
        assert abs(pred.pred_TMB.mean() - pred.TMB.mean()) < 0.25 * pred.TMB.std()
    # `mil report` rebuilds the task from run.yaml; its scores equal scikit-learn's / scipy's / Harrell's C by hand
    for folder in (out, ext):
        (folder / "metrics.json").unlink()
        report_predictions(folder)
        found = _score(task, json.loads((folder / "metrics.json").read_text()))
        assert found == pytest.approx(_reference_score(task, pd.read_csv(folder / "predictions.csv")), abs=1e-9)


def test_rerun_keeps_every_finished_fold(run, monkeypatch):
    """Resuming reads the finished folds back (label columns as written) and reports the same."""
    _task, cfg, out, _ = run
    before = [(out / name).read_text() for name in ("predictions.csv", "metrics.json")]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(mil.crossval, "run_fold", no_training)
    run_crossval(cfg)
    assert [(out / name).read_text() for name in ("predictions.csv", "metrics.json")] == before
