"""`mil predict` on an external cohort, and the contract between a run and new bags."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mil.bags import write_bag
from mil.config import ConfigError, load_config
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


def test_external_auroc_matches_scikit_learn_and_is_not_below_crossval(trained):
    tmp, cv, ext = trained
    out = run_predict(cv, [*_cohort(ext), f"output_dir={tmp / 'ext'}"])
    pred = pd.read_csv(out / "predictions.csv")
    each = [f"fold_{k}.inner_{j}.prob_MSI-H" for k in range(3) for j in range(3)]  # 3 folds x 3 inner models
    assert len(pred) == 24 and {"prob_MSS", "prob_MSI-H", "fold_2.inner_1.prob_MSS", *each} <= set(pred.columns)
    ensemble = pred[each].mean(axis=1)
    np.testing.assert_allclose(pred["prob_MSI-H"], ensemble, atol=1e-6)
    for name in ("metrics.json", "roc.png", "pr.png", "calibration.png", "summary.md"):
        assert (out / name).is_file(), name
    ext_auroc = json.loads((out / "metrics.json").read_text())["pooled"]["auroc"]["value"]
    cv_auroc = json.loads((cv / "metrics.json").read_text())["pooled"]["auroc"]
    assert ext_auroc == pytest.approx(roc_auc_score(pred.MSI == "MSI-H", pred["prob_MSI-H"]), abs=1e-12)
    # The fold ensemble on new patients is no worse than cross-validation's lower bound (here it is
    # better: 9 models averaged), and the signal transfers.
    # A perfect cross-validation gives a degenerate [1, 1] interval: allow one discordant pair's worth.
    assert ext_auroc >= cv_auroc["ci_low"] - 0.02 and ext_auroc > 0.8


def test_predicting_the_training_patients_is_not_called_external(trained, synthetic_cohort, caplog):
    tmp, cv, ext = trained
    c = synthetic_cohort
    own = [f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}", f"cohort.features_dir={c.features_dir}"]
    with caplog.at_level("WARNING", logger="mil.predict"):
        out = run_predict(cv, [*own, f"output_dir={tmp / 'own'}"])
    n = pd.read_csv(c.clinical_csv).shape[0]
    assert f"{n} of the cohort's {n} patients" in caplog.text and "not an external" in caplog.text
    assert OmegaConf.load(out / "run.yaml").patients_seen_in_training == n
    assert (out / "summary.md").read_text().startswith("**Not an external validation:**")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mil.predict"):  # new patients: no warning, nothing recorded
        ext_out = run_predict(cv, [*_cohort(ext), f"output_dir={tmp / 'ext-again'}"])
    assert "trained or validated on" not in caplog.text
    assert "patients_seen_in_training" not in OmegaConf.load(ext_out / "run.yaml")
    assert "Not an external" not in (ext_out / "summary.md").read_text()


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
    (out / "metrics.json").unlink()
    report_predictions(out / "predictions.csv")
    pooled = json.loads((out / "metrics.json").read_text())["pooled"]
    pred = pd.read_csv(out / "predictions.csv")
    y, p = (pred.MSI == "MSI-H").to_numpy(), pred["prob_MSI-H"].to_numpy()
    assert pooled["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # the calls follow the validation-chosen threshold recorded in the run
    calls = (pred["pred_MSI"] == "MSI-H").to_numpy()
    assert pooled["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, calls), abs=1e-12)
    # the percentile bootstrap by hand (run.yaml: 1000 resamples, seed 0), scikit-learn's AUROC
    rng, boot = np.random.default_rng(0), []
    for _ in range(1000):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            boot.append(roc_auc_score(y[idx], p[idx]))
    assert [pooled["auroc"]["ci_low"], pooled["auroc"]["ci_high"]] == pytest.approx(np.quantile(boot, [0.025, 0.975]))


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


# ---------------------------------------------------------------- runs that cannot lie (issue 11)
def test_predict_never_writes_into_a_run_folder(trained, tmp_path, monkeypatch):
    _tmp, cv, ext = trained
    before = {p.name: p.stat().st_mtime_ns for p in cv.iterdir() if p.is_file()}
    monkeypatch.chdir(cv.parent)
    same_folder = [f"{cv}/", f"{cv}/.", cv.name]  # spelled differently from the saved output_dir
    for out in same_folder:
        with pytest.raises(ConfigError, match="is the training run's folder"):
            run_predict(cv, [*_cohort(ext), f"output_dir={out}"])
    copied = tmp_path / "copied.yaml"  # a copy of the run's YAML, output_dir and all, as in the issue
    copied.write_text((cv / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="is the training run's folder"):
        run_predict(cv, [str(copied), *_cohort(ext)])
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.yaml").write_text("output_dir: elsewhere\n")
    with pytest.raises(ConfigError, match="holds a training run"):
        run_predict(cv, [*_cohort(ext), f"output_dir={other}"])
    assert {p.name: p.stat().st_mtime_ns for p in cv.iterdir() if p.is_file()} == before
    first = run_predict(cv, [*_cohort(ext), f"output_dir={tmp_path / 'ext'}"])
    run_predict(cv, [*_cohort(ext), f"output_dir={first}"])  # the same prediction again: allowed
    with pytest.raises(ConfigError, match="holds predictions .* not a trained model"):
        run_predict(first, [*_cohort(ext), f"output_dir={tmp_path / 'x'}"])


def test_a_damaged_run_gives_a_message(trained, tmp_path):
    _tmp, cv, ext = trained
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.yaml").write_text((cv / "config.yaml").read_text())
    meta = OmegaConf.load(cv / "run.yaml")
    del meta["in_dim"]
    (damaged / "run.yaml").write_text(OmegaConf.to_yaml(meta))
    with pytest.raises(ConfigError, match=r"damaged/run\.yaml is damaged .*missing in_dim"):
        run_predict(damaged, [*_cohort(ext), f"output_dir={tmp_path / 'o'}"])


def test_other_resolution_or_tile_size_is_named(trained, tmp_path, caplog):
    _, cv, ext = trained
    slides = pd.read_csv(ext.slide_csv)
    base = {"encoder": "synthetic", "encoder_weights": "none", "embedding": "planted-binary-witness"}
    for sid in slides.slide_id:
        write_bag(tmp_path / "coarse" / f"{sid}.h5", np.ones((4, 16)), attrs={**base, "mpp": 1.0, "tile_px": 448})
        write_bag(tmp_path / "foreign" / f"{sid}.h5", np.ones((4, 16)), attrs=base)
    with pytest.raises(RunMismatchError, match=r"mpp: run '0.5' vs cohort '1', tile_px: run '224' vs cohort '448'"):
        run_predict(cv, [*_cohort(ext), f"cohort.features_dir={tmp_path / 'coarse'}", f"output_dir={tmp_path / 'o1'}"])
    with caplog.at_level("WARNING"):
        run_predict(cv, [*_cohort(ext), f"cohort.features_dir={tmp_path / 'foreign'}", f"output_dir={tmp_path / 'o2'}"])
    assert "cannot check that the bags match the run in mpp, tile_px" in caplog.text


def test_report_on_unlabelled_predictions_says_so(trained, tmp_path):
    _tmp, cv, ext = trained
    clinical = pd.read_csv(ext.clinical_csv).drop(columns=["MSI"])
    clinical.to_csv(tmp_path / "nolabels.csv", index=False)
    out = run_predict(cv, [*_cohort(ext), f"cohort.clinical_csv={tmp_path / 'nolabels.csv'}", f"output_dir={tmp_path / 'p'}"])
    (out / "metrics.json").write_text("{}")  # left over from an earlier, labelled prediction
    report_predictions(out)  # crashed: operands could not be broadcast together with shapes (0,) (2,)
    summary = (out / "summary.md").read_text()
    assert "24 bags predicted; no labels, so no metrics" in summary and "| predicted class | bags |" in summary
    assert not (out / "metrics.json").exists()
