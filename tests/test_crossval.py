"""`mil crossval` / `mil train` end to end on a tiny synthetic cohort."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import mil.crossval
import mil.fitting
import mil.inference
from mil.cohort import load_cohort
from mil.config import ConfigError, load_config
from mil.crossval import run_crossval, run_train
from mil.splits import load_splits


def _cfg(tmp_path, cohort_overrides, fast_overrides, *extra, name="run"):
    return load_config([*cohort_overrides, *fast_overrides, f"output_dir={tmp_path / name}", *extra])


def test_crossval_outputs(tmp_path, cohort_overrides, fast_overrides):
    out = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides))
    for name in ["config.yaml", "run.yaml", "splits.yaml", "skipped.csv", "predictions.csv", "metrics.json",
                 "summary.md", "roc.png", "pr.png", "calibration.png"]:
        assert (out / name).is_file(), name
    for k in range(3):
        assert {"model.safetensors", "predictions.csv", "summary.json"} <= {p.name for p in (out / f"fold_{k}").iterdir()}
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert list(pred.columns) == ["patient_id", "fold", "MSI", "prob_MSS", "prob_MSI-H", "pred_MSI"]
    assert pred.patient_id.is_unique and len(pred) == 30
    assert ((pred.prob_MSS + pred["prob_MSI-H"]) - 1).abs().max() < 1e-5
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["folds"]) == {"fold_0", "fold_1", "fold_2"}
    pooled = metrics["pooled"]["auroc"]
    assert pooled["ci_low"] <= pooled["value"] <= pooled["ci_high"]
    assert set(metrics["across_folds"]["auroc"]) == {"mean", "std"}
    meta = OmegaConf.load(out / "run.yaml")
    assert list(meta.classes) == ["MSS", "MSI-H"] and meta.in_dim == 16 and meta.encoder.encoder == "synthetic"
    # The saved config reruns: it validates against the schema.
    assert load_config([str(out / "config.yaml")]).cohort.target == "MSI"


def test_no_patient_leaks_and_test_fold_untouched_until_evaluation(tmp_path, cohort_overrides, fast_overrides, monkeypatch):
    """Record every bag read and every final evaluation; test bags must appear only at evaluation."""
    events: list[tuple[str, str]] = []
    import mil.data

    real_read, real_predict = mil.data.read_features, mil.fitting.predict_outputs

    def read(path, *a, **kw):
        events.append(("read", path.stem.split("-")[0]))
        return real_read(path, *a, **kw)

    def predict(model, bags, *a, **kw):
        events.append(("evaluate", ""))
        return real_predict(model, bags, *a, **kw)

    monkeypatch.setattr(mil.data, "read_features", read)
    monkeypatch.setattr(mil.fitting, "predict_outputs", predict)
    out = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides))
    folds = load_splits(out / "splits.yaml", set(pd.read_csv(out / "predictions.csv").patient_id))
    # Split events by evaluation markers: segment k holds fold k's training then its evaluation.
    marks = [i for i, e in enumerate(events) if e[0] == "evaluate"]
    assert len(marks) == len(folds)
    start = 0
    for fold, mark in zip(folds, marks, strict=True):
        assert not set(fold.train) & set(fold.val) and not (set(fold.train) | set(fold.val)) & set(fold.test)
        trained_on = {p for kind, p in events[start:mark] if kind == "read"}
        assert trained_on <= set(fold.train) | set(fold.val)
        assert not trained_on & set(fold.test), f"{fold.name}: test patients read before evaluation"
        next_mark = marks[marks.index(mark) + 1] if mark != marks[-1] else len(events)
        evaluated = {p for kind, p in events[mark:next_mark] if kind == "read"}
        assert set(fold.test) <= evaluated
        start = mark + 1


def test_same_seed_same_predictions(tmp_path, cohort_overrides, fast_overrides):
    a = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, name="a"))
    b = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, name="b"))
    assert (a / "splits.yaml").read_text() == (b / "splits.yaml").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"))


def test_resume_keeps_finished_folds_and_redoes_interrupted(tmp_path, cohort_overrides, fast_overrides, monkeypatch):
    cfg = _cfg(tmp_path, cohort_overrides, fast_overrides)
    real_fold = mil.crossval.run_fold
    calls = []

    def crash_on_second(cfg, cohort, fold, fold_dir, seed):
        calls.append(fold.name)
        if len(calls) == 2:
            (fold_dir / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (fold_dir / "model.safetensors").write_bytes(b"half-written")  # no predictions.csv: unfinished
            raise KeyboardInterrupt
        return real_fold(cfg, cohort, fold, fold_dir, seed)

    monkeypatch.setattr(mil.crossval, "run_fold", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_crossval(cfg)
    out = tmp_path / "run"
    first = (out / "fold_0" / "predictions.csv").read_text()
    assert not (out / "fold_1" / "predictions.csv").exists() and not (out / "predictions.csv").exists()

    calls.clear()
    monkeypatch.setattr(mil.crossval, "run_fold", real_fold)
    monkeypatch.setattr(mil.crossval, "run_fold", lambda *a, **kw: calls.append(a[2].name) or real_fold(*a, **kw))
    run_crossval(cfg)
    assert calls == ["fold_1", "fold_2"]  # fold_0 kept, interrupted fold_1 redone
    assert (out / "fold_0" / "predictions.csv").read_text() == first
    assert len(pd.read_csv(out / "predictions.csv")) == 30


def test_resume_with_changed_config_is_refused(tmp_path, cohort_overrides, fast_overrides):
    cfg = _cfg(tmp_path, cohort_overrides, fast_overrides, "train.max_epochs=1")
    run_crossval(cfg)
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(train.lr: 0.003 -> 0.1\)"):
        run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, "train.max_epochs=1", "train.lr=0.1"))


def test_resume_with_changed_config_is_refused_once_an_inner_model_is_finished(tmp_path, cohort_overrides,
                                                                               fast_overrides, monkeypatch):
    import mil.ensemble

    real_fit, calls = mil.ensemble.fit_model, []

    def interrupted_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(mil.ensemble, "fit_model", interrupted_on_second)
    first = ["train.max_epochs=1", "cv.inner_folds=2", "cv.jobs=1"]
    with pytest.raises(KeyboardInterrupt):
        run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, *first))
    assert (tmp_path / "run" / "fold_0" / "inner_0" / "member.json").is_file()
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(train.lr: 0.003 -> 0.1\)"):
        run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, *first, "train.lr=0.1"))


def test_split_file_is_reused_exactly(tmp_path, cohort_overrides, fast_overrides):
    a = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, "train.max_epochs=1", name="a"))
    b = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, "train.max_epochs=1", "cv.seed=99",
                          f"cv.split_file={a / 'splits.yaml'}", name="b"))
    assert (a / "splits.yaml").read_text() == (b / "splits.yaml").read_text()


def test_slide_level_crossval(tmp_path, cohort_overrides, fast_overrides):
    out = run_crossval(_cfg(tmp_path, cohort_overrides, fast_overrides, "cohort.bag_level=slide", "train.max_epochs=1"))
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns[:3]) == ["patient_id", "slide_id", "fold"]
    folds = load_splits(out / "splits.yaml", set(pred.patient_id))
    for f in folds:  # slides of one patient never straddle train and test
        assert set(pred[pred.fold == f.name].patient_id) == set(f.test)


def test_train_writes_one_model(tmp_path, cohort_overrides, fast_overrides):
    import lightning as L
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, cohort_overrides, fast_overrides)
    out = run_train(cfg)
    (split,) = load_splits(out / "splits.yaml", set(load_cohort(cfg.cohort).patient_ids.tolist()))
    assert not set(split.train) & set(split.val) and len(split.train) + len(split.val) == 30 and not split.test
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == len(split.train) and 0 <= summary["best_epoch"] < 4
    model = mil.crossval.load_run_model(out, out / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    L.seed_everything(cfg.train.seed, verbose=False)  # the initial weights, as _train_one draws them
    initial = mil.fitting.build_model(cfg, 16, 2).state_dict()
    assert any(not torch.equal(initial[k], loaded[k]) for k in initial), "the saved weights were never trained"


def test_cli_error_is_one_clear_line(tmp_path, cohort_overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "mil", "crossval", *cohort_overrides, "model.name=gated_abmill", f"output_dir={tmp_path}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Unknown model 'gated_abmill'. Did you mean 'gated_abmil'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="DDP test uses gloo on Linux")
def test_ddp_validation_counts_each_bag_once(tmp_path, cohort_overrides, fast_overrides):
    """`trainer.devices=2 trainer.strategy=ddp` (gloo on CPU): the two processes validate disjoint bags that
    together are the whole validation split, and the gathered metrics equal scikit-learn's on all of them."""
    from pathlib import Path

    from sklearn.metrics import accuracy_score, roc_auc_score

    from mil.splits import inner_split
    from mil.tasks import task_class

    def val_bags(extra):  # the validation split run_train will make
        cfg = _cfg(tmp_path, cohort_overrides, fast_overrides, *extra)
        cohort = load_cohort(cfg.cohort, columns=task_class(cfg).label_columns(cfg))
        strata = task_class(cfg)(cohort.columns, cfg).strata(cohort.bags)[0]
        _, val = inner_split(cohort.patient_ids, strata, cfg.cv.val_fraction, seed=cfg.cv.seed)
        return sum(b.patient_id in set(val) for b in cohort.bags)

    # an odd number of validation bags is what a padding sampler gets wrong on 2 processes
    choice = next(extra for level in ("patient", "slide") for fraction in (0.2, 0.25, 0.3, 0.35, 0.4)
                  if val_bags(extra := [f"cohort.bag_level={level}", f"cv.val_fraction={fraction}"]) % 2 == 1)
    records = tmp_path / "records"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("ddp_validation.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(records), *cohort_overrides, *fast_overrides, "trainer.devices=2",
         "trainer.strategy=ddp", "train.max_epochs=2", "train.selection=best",  # validate every epoch
         *choice, f"output_dir={tmp_path / 'ddp'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
    n_val = val_bags(choice)
    for epoch in range(2):
        ranks = [json.loads((records / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        seen = [[s[0] for s in r["seen"]] for r in ranks]
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(n_val))
        rows = [s for r in ranks for s in r["seen"]]
        y = [t for _, _, t in rows]
        logits = np.array([logits for _, logits, _ in rows])
        p1 = 1 / (1 + np.exp(logits[:, 0] - logits[:, 1]))  # softmax, positive class
        for r in ranks:  # every process logged the metrics of the whole split
            assert r["metrics"]["val_auroc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-5)
            assert r["metrics"]["val_accuracy"] == pytest.approx(accuracy_score(y, p1 > 0.5), abs=1e-5)


@pytest.mark.parametrize("name", __import__("mil.models", fromlist=["MODELS"]).MODELS.names())
def test_every_registered_model_trains(tmp_path, cohort_overrides, fast_overrides, name):
    """A one-epoch fit of each aggregator through the Lightning loop (auxiliary losses included)."""
    cfg = _cfg(tmp_path, cohort_overrides, fast_overrides, f"model.name={name}", "train.max_epochs=1",
               "model.args={hidden_dim: 16}")
    out = run_train(cfg)
    model = mil.crossval.load_run_model(out, out / "model.safetensors")
    probs = mil.inference.predict_bags(model, load_cohort(cfg.cohort).bags[:3])
    assert probs.shape == (3, 2) and abs(probs.sum(1) - 1).max() < 1e-5


def test_fold_model_saves_inner_models_only_where_the_ensemble_has_not_written_them(tmp_path):
    import torch

    from mil.fitting import FoldModel

    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    ensemble_dir, elsewhere = tmp_path / "fold_0", tmp_path / "copy"
    trained = FoldModel(models, [None, None], {}, saved_in=ensemble_dir)
    names = ["inner_0/model.safetensors", "inner_1/model.safetensors"]
    assert trained.save(ensemble_dir) == names
    assert not ensemble_dir.exists()  # mil.ensemble wrote them as each ended: not written twice
    assert trained.save(elsewhere) == names
    assert all((elsewhere / n).is_file() for n in names)
    single = FoldModel(models[:1], [None], {}, saved_in=ensemble_dir)
    assert single.save(ensemble_dir) == ["model.safetensors"] and (ensemble_dir / "model.safetensors").is_file()
