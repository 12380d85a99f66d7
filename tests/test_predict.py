"""`mil predict` on an external cohort, and the contract between a run and new bags."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mil.bags import write_bag
from mil.config import load_config
from mil.crossval import run_crossval, run_train
from mil.predict import RunMismatchError, run_predict
from mil.report import report_predictions
from mil.synthetic import make_synthetic_cohort


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_cohort):
    c = synthetic_cohort
    tmp = tmp_path_factory.mktemp("predict")
    base = [f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}",
            f"cohort.features_dir={c.features_dir}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]",
            "model.args={hidden_dim: 32}", "cv.folds=3", "cv.bootstrap=200", "train.max_epochs=15", "train.min_steps=0", "train.batch_size=4",
            "train.lr=3e-3", "train.precision=32-true", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "trainer.logger=none"]
    cv = run_crossval(load_config([*base, f"output_dir={tmp / 'cv'}"]))
    external = make_synthetic_cohort(tmp / "external", n_patients=24, tiles_per_slide=(12, 30), dim=16, seed=99, prefix="X")
    return tmp, cv, external


def _cohort(ext):
    return [f"cohort.clinical_csv={ext.clinical_csv}", f"cohort.slide_csv={ext.slide_csv}", f"cohort.features_dir={ext.features_dir}"]


def test_external_auroc_within_crossval_interval(trained):
    tmp, cv, ext = trained
    out = run_predict(cv, [*_cohort(ext), f"output_dir={tmp / 'ext'}"])
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 24 and {"prob_MSS", "prob_MSI-H", "fold_0.prob_MSI-H", "fold_2.prob_MSS"} <= set(pred.columns)
    ensemble = pred[[f"fold_{k}.prob_MSI-H" for k in range(3)]].mean(axis=1)
    np.testing.assert_allclose(pred["prob_MSI-H"], ensemble, atol=1e-6)
    for name in ("metrics.json", "roc.png", "pr.png", "calibration.png", "summary.md"):
        assert (out / name).is_file(), name
    ext_auroc = json.loads((out / "metrics.json").read_text())["pooled"]["auroc"]["value"]
    cv_auroc = json.loads((cv / "metrics.json").read_text())["pooled"]["auroc"]
    assert cv_auroc["ci_low"] <= ext_auroc <= cv_auroc["ci_high"] or ext_auroc >= cv_auroc["value"]
    assert ext_auroc > 0.8


def test_unlabelled_cohort_gets_predictions_only(trained):
    tmp, cv, ext = trained
    clinical = pd.read_csv(ext.clinical_csv).drop(columns=["MSI"])
    clinical.to_csv(tmp / "nolabels.csv", index=False)
    out = run_predict(cv, [*_cohort(ext), f"cohort.clinical_csv={tmp / 'nolabels.csv'}", f"output_dir={tmp / 'nolab'}"])
    assert (out / "predictions.csv").is_file() and not (out / "metrics.json").exists()


def test_train_run_predicts_and_report_recomputes(trained, synthetic_cohort):
    tmp, _cv, ext = trained
    c = synthetic_cohort
    run = run_train(load_config([f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}",
                                 f"cohort.features_dir={c.features_dir}", "cohort.target=MSI", "train.max_epochs=2", "train.min_steps=0",
                                 "trainer.enable_progress_bar=false", "trainer.logger=none", f"output_dir={tmp / 'final'}"]))
    out = run_predict(run, [*_cohort(ext), f"output_dir={tmp / 'final-ext'}"])
    first = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    report_predictions(out / "predictions.csv")
    again = json.loads((out / "metrics.json").read_text())
    assert again["pooled"]["auroc"] == first["pooled"]["auroc"]


def test_mismatched_dimension_and_encoder_are_named(trained, tmp_path):
    _, cv, ext = trained
    slides = pd.read_csv(ext.slide_csv)
    for sid in slides.slide_id:
        write_bag(tmp_path / "wide" / f"{sid}.h5", np.ones((4, 24)), attrs={"encoder": "synthetic", "encoder_weights": "none", "embedding": "planted-signal"})
        write_bag(tmp_path / "other" / f"{sid}.h5", np.ones((4, 16)), attrs={"encoder": "virchow2", "embedding": "cls+mean"})
    with pytest.raises(RunMismatchError, match=r"trained on 16-d features, the bags in .*wide are 24-d"):
        run_predict(cv, [*_cohort(ext), f"cohort.features_dir={tmp_path / 'wide'}", f"output_dir={tmp_path / 'o1'}"])
    with pytest.raises(RunMismatchError, match=r"encoder: run 'synthetic' vs cohort 'virchow2'"):
        run_predict(cv, [*_cohort(ext), f"cohort.features_dir={tmp_path / 'other'}", f"output_dir={tmp_path / 'o2'}"])


def test_other_class_names_are_an_error(trained, tmp_path):
    _tmp, cv, ext = trained
    clinical = pd.read_csv(ext.clinical_csv)
    clinical["MSI"] = clinical["MSI"].replace({"MSI-H": "MSI"})
    clinical.to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(ValueError, match=r"label 'MSI' .* is not in cohort.classes \['MSS', 'MSI-H'\]"):
        run_predict(cv, [*_cohort(ext), f"cohort.clinical_csv={tmp_path / 'renamed.csv'}", f"output_dir={tmp_path / 'o'}"])
