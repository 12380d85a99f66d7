"""Decision thresholds: chosen on validation predictions only, recorded, and reused by `mil predict`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mil.cohort import load_cohort
from mil.config import ConfigError, load_config
from mil.crossval import load_run_model, run_crossval
from mil.inference import predict_outputs
from mil.metrics import classification_metrics, with_intervals
from mil.splits import load_splits
from mil.thresholds import ThresholdRule, call_classes


def _rule(*overrides):
    return ThresholdRule.from_config(load_config(list(overrides)))


def test_youden_sensitivity_specificity_and_fixed_rules():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # Youden's J is 0.75 at cuts 0.7 (sens 3/4, spec 1) and 0.4 (sens 1, spec 3/4), 0.5 at 0.6: the higher tie
    # wins, and the threshold sits midway to the next lower score (0.6): the same validation calls.
    assert _rule().choose(y, p) == pytest.approx(0.65)
    # Sensitivity >= 1: the highest cut that still calls every positive (0.4), midway to 0.3.
    assert _rule("task.threshold=sensitivity", "task.threshold_target=1.0").choose(y, p) == pytest.approx(0.35)
    # Specificity >= 1: the lowest cut that calls no negative (0.7), midway to 0.6.
    assert _rule("task.threshold=specificity", "task.threshold_target=1.0").choose(y, p) == pytest.approx(0.65)
    assert _rule("task.threshold=fixed").choose(y, p) == 0.5
    assert _rule("task.threshold=fixed", "task.threshold_target=0.3").choose(y, p) == 0.3
    assert _rule().choose(np.zeros(4), np.random.default_rng(0).random(4)) == 0.5  # single class: fallback


def test_saturated_validation_scores_do_not_put_the_threshold_at_one():
    """Every validation positive at P = 1.0 (float32 softmax saturates on an easy task): a threshold
    of 1.0 called a test positive scored 0.9999 negative (demo: AUROC 1.0, balanced accuracy 0.83)."""
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.01, 0.2, 0.4, 1.0, 1.0, 1.0])
    for rule in (_rule(), _rule("task.threshold=sensitivity", "task.threshold_target=0.9"),
                 _rule("task.threshold=specificity", "task.threshold_target=0.9")):
        t = rule.choose(y, p)
        assert t == pytest.approx(0.7), rule
        assert rule.choose(y, p) <= 0.9999  # a near-certain test positive is called positive
    assert _rule().choose(np.array([0, 1]), np.array([0.3, 0.3])) == pytest.approx(0.3)  # one distinct score: itself


def test_bad_threshold_config_is_named():
    with pytest.raises(ConfigError, match="task.threshold must be one of"):
        _rule("task.threshold=best")
    with pytest.raises(ConfigError, match="needs task.threshold_target"):
        _rule("task.threshold=sensitivity")
    with pytest.raises(ConfigError, match=r"lie in \[0, 1\]"):
        _rule("task.threshold=fixed", "task.threshold_target=2")


def test_calls_and_call_metrics():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    assert list(call_classes(probs, ["neg", "pos"], 0.35)) == ["neg", "pos", "pos"]
    assert list(call_classes(probs, ["neg", "pos"], None)) == ["neg", "neg", "pos"]
    m = classification_metrics(np.array([0, 1, 1]), probs, np.array([0, 1, 1]))
    assert m["sensitivity"] == 1 and m["specificity"] == 1 and m["balanced_accuracy"] == 1
    argmax = classification_metrics(np.array([0, 1, 1]), probs)
    assert argmax["sensitivity"] == 0.5 and isinstance(argmax["n"], int)
    pooled = with_intervals(classification_metrics, np.array([0, 1, 1, 0]), np.vstack([probs, probs[:1]]), n_boot=20)
    assert pooled["n"] == {"value": 4} and all(0 <= pooled[k]["ci_low"] <= pooled[k]["ci_high"] <= 1
                                               for k in pooled if k != "n" and not np.isnan(pooled[k]["ci_low"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_cohort):
    c = synthetic_cohort
    out = tmp_path_factory.mktemp("thr") / "cv"
    cfg = load_config([
        f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}", f"cohort.features_dir={c.features_dir}",
        "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]", "model.args={hidden_dim: 32}", "cv.folds=3", "cv.bootstrap=50",
        "train.max_epochs=4", "train.min_steps=0", "train.warmup_steps=0", "train.min_epochs=1", "train.batch_size=4", "train.bag_size=16", "train.lr=3e-3",
        "train.refit=false",  # the saved model is the one the threshold was chosen with (the refit test covers the other case)
        "cv.inner_folds=0",  # one validation split, recomputed below (the inner-fold tests cover the ensemble)
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none", f"output_dir={out}",
        "task.threshold=sensitivity", "task.threshold_target=0.9"])
    return run_crossval(cfg), cfg


def test_threshold_is_chosen_on_validation_predictions_and_called(run):
    out, cfg = run
    cohort = load_cohort(cfg.cohort, columns=None)
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    folds = load_splits(out / "splits.yaml", set(cohort.patient_ids.tolist()))
    meta = OmegaConf.load(out / "run.yaml")
    rule = ThresholdRule("sensitivity", 0.9)
    assert meta.thresholds.rule == "sensitivity" and meta.thresholds.target == 0.9
    for fold in folds:
        t = json.loads((out / fold.name / "summary.json").read_text())["threshold"]
        assert meta.thresholds.models[fold.name] == pytest.approx(t)
        # Recompute from the fold's model on its validation bags only: the same value.
        model = load_run_model(out, out / fold.name / "model.safetensors")
        val = cohort.subset(set(fold.val))
        p = predict_outputs(model, val, 1, "cpu")
        probs = np.exp(p - p.max(1, keepdims=True))
        probs = probs[:, 1] / probs.sum(1)
        y = np.array([b.labels["MSI"] == "MSI-H" for b in val])
        assert rule.choose(y, probs) == pytest.approx(t, abs=1e-6)
        rows = pred[pred.fold == fold.name]
        expected = np.where(rows["prob_MSI-H"] >= t, "MSI-H", "MSS")
        assert (rows["pred_MSI"].to_numpy() == expected).all()
    assert meta.thresholds.ensemble == pytest.approx(np.mean(list(meta.thresholds.models.values())))
    metrics = json.loads((out / "metrics.json").read_text())
    calls = (pred.pred_MSI == "MSI-H").to_numpy()
    truth = (pred.MSI == "MSI-H").to_numpy()
    assert metrics["pooled"]["sensitivity"]["value"] == pytest.approx(calls[truth].mean())
    assert metrics["pooled"]["specificity"]["value"] == pytest.approx((~calls[~truth]).mean())
    assert isinstance(metrics["pooled"]["n"]["value"], int)
    summary = (out / "summary.md").read_text()
    assert "sensitivity >= 0.9 on the inner validation split" in summary and "per fold" in summary


def test_predict_reuses_the_runs_threshold(run, tmp_path, synthetic_cohort):
    from mil.predict import run_predict

    out, _ = run
    c = synthetic_cohort
    ext = run_predict(out, [f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}",
                            f"cohort.features_dir={c.features_dir}", f"output_dir={tmp_path / 'ext'}"])
    t = OmegaConf.load(out / "run.yaml").thresholds.ensemble
    pred = pd.read_csv(ext / "predictions.csv")
    assert (pred.pred_MSI.to_numpy() == np.where(pred["prob_MSI-H"] >= t, "MSI-H", "MSS")).all()
    assert OmegaConf.load(ext / "run.yaml").thresholds.ensemble == pytest.approx(t)
    assert f"fold ensemble {t:.3f}" in (ext / "summary.md").read_text()
    per_slide = pd.read_csv(ext / "slide_predictions.csv")
    assert len(per_slide) == len(pd.read_csv(c.slide_csv)) and "prob_MSI-H" in per_slide


def test_patient_level_runs_write_per_slide_scores(run, synthetic_cohort):
    """slide_predictions.csv: every slide through its fold's model; a one-slide patient's slide score is the patient's."""
    out, _ = run
    slides = pd.read_csv(synthetic_cohort.slide_csv, dtype=str)
    per_slide = pd.read_csv(out / "slide_predictions.csv", dtype={"patient_id": str, "slide_id": str})
    assert list(per_slide.columns) == ["patient_id", "slide_id", "fold", "MSI", "prob_MSS", "prob_MSI-H"]
    assert sorted(per_slide.slide_id) == sorted(slides.slide_id)
    patients = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str}).set_index("patient_id")
    counts = slides.patient_id.value_counts()
    single = per_slide[per_slide.patient_id.map(counts) == 1]
    multi = per_slide[per_slide.patient_id.map(counts) > 1]
    assert len(single) and len(multi)
    np.testing.assert_allclose(single["prob_MSI-H"], patients.loc[single.patient_id, "prob_MSI-H"], atol=1e-5)
    assert (single.fold.to_numpy() == patients.loc[single.patient_id, "fold"].to_numpy()).all()
    # A patient with several slides: each slide scored alone, by the fold model that predicted the patient.
    row = multi.iloc[0]
    model = load_run_model(out, out / row.fold / "model.safetensors")
    from mil.cohort import load_cohort
    from mil.slide_scores import slide_bags

    bag = next(b for b in load_cohort(load_config([str(out / "config.yaml")]).cohort, columns=None).bags
               if b.patient_id == row.patient_id)
    one = next(b for b in slide_bags([bag]) if b.slide_ids == [row.slide_id])
    logits = predict_outputs(model, [one], 1, "cpu")[0]
    p = np.exp(logits - logits.max())
    assert p[1] / p.sum() == pytest.approx(row["prob_MSI-H"], abs=1e-5)
