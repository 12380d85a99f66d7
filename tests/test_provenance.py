"""Reruns that cannot lie: what a fold was computed from is recorded and compared on resume."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

import mil.crossval
from mil.bags import BagError, write_bag
from mil.config import ConfigError, load_config
from mil.crossval import run_crossval, run_train
from mil.splits import SplitError, load_splits, make_splits, save_splits
from mil.synthetic import make_synthetic_cohort

FAST = ["model.args={hidden_dim: 16}", "cv.folds=3", "cv.bootstrap=20", "train.max_epochs=1", "train.min_steps=0", "train.refit=false",
        "train.warmup_steps=0", "train.min_epochs=1",
        "train.batch_size=4", "train.bag_size=16", "train.precision=32-true", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.logger=none"]


@pytest.fixture
def cohort(tmp_path):
    """A fresh (writable) 30-patient cohort: tests here change its tables and bags."""
    return make_synthetic_cohort(tmp_path / "cohort", n_patients=30, tiles_per_slide=(8, 16), dim=8, seed=3)


def _cfg(c, out, *extra):
    return load_config([f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}",
                        f"cohort.features_dir={c.features_dir}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]",
                        *FAST, f"output_dir={out}", *extra])


def _identity(bag):
    """The identity attributes (encoder, embedding, resolution) of an existing bag, to rewrite it like its peers."""
    import h5py

    with h5py.File(bag, "r") as f:
        return {k: f.attrs[k] for k in ("encoder", "encoder_weights", "embedding", "tile_px", "mpp") if k in f.attrs}


def _predictions(out):
    return pd.read_csv(out / "predictions.csv", dtype={"patient_id": str, "MSI": str})


def test_changed_labels_deleted_and_added_patients_redo_the_folds(cohort, tmp_path, caplog):
    out = tmp_path / "run"
    run_crossval(_cfg(cohort, out))
    clinical = pd.read_csv(cohort.clinical_csv, dtype=str)
    flipped = clinical.patient_id.iloc[:3].tolist()
    clinical.loc[:2, "MSI"] = clinical.loc[:2, "MSI"].map({"MSS": "MSI-H", "MSI-H": "MSS"})
    deleted = clinical.patient_id.iloc[5]
    clinical = clinical[clinical.patient_id != deleted]
    clinical.to_csv(cohort.clinical_csv, index=False)

    with caplog.at_level(logging.WARNING, logger="mil.crossval"):
        run_crossval(_cfg(cohort, out))
    log = caplog.text
    assert "already finished" not in log
    assert "computed from other data than now" in log and "redoing it" in log
    assert "label(s) changed" in log and f"{flipped[0]} MSI" in log
    assert f"no longer in the cohort: {deleted}" in log or deleted in log
    pred = _predictions(out)
    assert len(pred) == 29 and deleted not in set(pred.patient_id)
    truth = clinical.set_index("patient_id").MSI
    assert (pred.set_index("patient_id").MSI == truth.loc[pred.patient_id].values).all()

    # Six new patients (bags + labels): each gets a prediction.
    new = make_synthetic_cohort(tmp_path / "new", n_patients=6, tiles_per_slide=(8, 16), dim=8, seed=7, prefix="N")
    for bag in new.features_dir.glob("*.h5"):
        os.replace(bag, cohort.features_dir / bag.name)
    pd.concat([clinical, pd.read_csv(new.clinical_csv, dtype=str)]).to_csv(cohort.clinical_csv, index=False)
    slides = pd.read_csv(cohort.slide_csv, dtype=str)
    pd.concat([slides, pd.read_csv(new.slide_csv, dtype=str)]).to_csv(cohort.slide_csv, index=False)
    run_crossval(_cfg(cohort, out))
    pred = _predictions(out)
    assert len(pred) == 35 and {f"N{i:04d}" for i in range(6)} <= set(pred.patient_id)
    assert pred.patient_id.is_unique


def test_a_rewritten_bag_redoes_the_folds_that_use_it(cohort, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    run_crossval(_cfg(cohort, out))
    bag = sorted(cohort.features_dir.glob("*.h5"))[0]
    write_bag(bag, np.zeros((5, 8)), attrs=_identity(bag))
    redone = []
    real = mil.crossval.run_fold
    monkeypatch.setattr(mil.crossval, "run_fold", lambda *a, **kw: redone.append(a[2].name) or real(*a, **kw))
    with caplog.at_level(logging.WARNING, logger="mil.crossval"):
        run_crossval(_cfg(cohort, out))
    assert redone == ["fold_0", "fold_1", "fold_2"]  # every fold trains, validates or tests on that patient
    assert f"bag files changed (size or modification time) for 1 bag(s): {bag.stem.split('-')[0]}" in caplog.text

    redone.clear()
    run_crossval(_cfg(cohort, out))  # nothing changed since: everything is kept
    assert redone == []


def test_a_changed_split_file_on_resume_is_refused(cohort, tmp_path, monkeypatch):
    out = tmp_path / "run"
    patients = np.array(pd.read_csv(cohort.clinical_csv, dtype=str).patient_id)
    labels = (pd.read_csv(cohort.clinical_csv).MSI == "MSI-H").to_numpy().astype(int)
    for seed, name in ((0, "a.yaml"), (1, "b.yaml")):
        save_splits(make_splits(patients, labels, ["MSS", "MSI-H"], 3, seed=seed), tmp_path / name)
    real = mil.crossval.run_fold

    def interrupt_after_first(cfg, cohort, fold, fold_dir, seed):
        if fold.name != "fold_0":
            raise KeyboardInterrupt
        return real(cfg, cohort, fold, fold_dir, seed)

    monkeypatch.setattr(mil.crossval, "run_fold", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_crossval(_cfg(cohort, out, f"cv.split_file={tmp_path / 'a.yaml'}"))
    monkeypatch.setattr(mil.crossval, "run_fold", real)
    with pytest.raises(SplitError, match=r"b\.yaml disagrees with the folds already finished .*fold_0: train patients differ"):
        run_crossval(_cfg(cohort, out, f"cv.split_file={tmp_path / 'b.yaml'}"))
    assert not (out / "fold_1").exists()
    run_crossval(_cfg(cohort, out, f"cv.split_file={tmp_path / 'a.yaml'}"))  # the same file resumes
    assert len(_predictions(out)) == 30


def test_a_split_file_missing_patients_is_an_error(cohort, tmp_path, synthetic_cohort):
    patients = np.array(pd.read_csv(cohort.clinical_csv, dtype=str).patient_id)
    labels = (pd.read_csv(cohort.clinical_csv).MSI == "MSI-H").to_numpy().astype(int)
    folds = make_splits(patients[:24], labels[:24], ["MSS", "MSI-H"], 3)
    save_splits(folds, tmp_path / "partial.yaml")
    with pytest.raises(SplitError, match=r"6 of the cohort's 30 patients are in no test fold \(P0024, P0025"):
        run_crossval(_cfg(cohort, tmp_path / "run", f"cv.split_file={tmp_path / 'partial.yaml'}"))
    assert load_splits(tmp_path / "partial.yaml", set(patients))  # the file itself is fine


def test_a_failed_run_does_not_block_the_corrected_command(cohort, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TypeError, match="hidden_dimm"):
        run_train(_cfg(cohort, out, "model.args={hidden_dimm: 16}"))
    assert (out / "config.yaml").is_file()
    run_train(_cfg(cohort, out))  # refused before: "holds a run with a different config"
    assert (out / "inner_0" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(train.lr"):
        run_train(_cfg(cohort, out, "train.lr=0.5"))  # now there is finished work to protect


def test_train_run_retrains_after_a_label_change(cohort, tmp_path, caplog):
    out = tmp_path / "run"
    run_train(_cfg(cohort, out))
    before = (out / "inner_0" / "model.safetensors").stat().st_mtime_ns
    run_train(_cfg(cohort, out))
    assert (out / "inner_0" / "model.safetensors").stat().st_mtime_ns == before  # same data: finished
    clinical = pd.read_csv(cohort.clinical_csv, dtype=str)
    clinical.loc[0, "MSI"] = "MSI-H" if clinical.loc[0, "MSI"] == "MSS" else "MSS"
    clinical.to_csv(cohort.clinical_csv, index=False)
    with caplog.at_level(logging.WARNING, logger="mil.crossval"):
        run_train(_cfg(cohort, out))
    assert "trained on other data than now" in caplog.text and "P0000 MSI" in caplog.text
    assert (out / "inner_0" / "model.safetensors").stat().st_mtime_ns != before


def test_every_bad_bag_is_reported_before_the_first_fold(cohort, tmp_path):
    bags = sorted(cohort.features_dir.glob("*.h5"))
    for bag, value in ((bags[3], np.nan), (bags[10], np.inf)):
        x = np.ones((6, 8), np.float32)
        x[2] = value
        identity = _identity(bag)
        with pytest.raises(BagError):
            write_bag(bag, x)  # our writer refuses; write like another tool would
        import h5py

        with h5py.File(bag, "w") as f:
            f.create_dataset("features", data=x)
            f.attrs.update(identity)
    out = tmp_path / "run"
    with pytest.raises(BagError, match=r"2 of \d+ bag file\(s\) cannot be used") as err:
        run_crossval(_cfg(cohort, out))
    assert f"{bags[3].name}: NaN or inf in 1 tile(s)" in str(err.value)
    assert f"{bags[10].name}: NaN or inf in 1 tile(s)" in str(err.value)
    assert not (out / "fold_0").exists()  # found before any training
