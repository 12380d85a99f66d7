"""Cross-validation folds as parallel jobs on one output folder (`--fold`, `mil status`, submitit)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mil.config import ConfigError, load_config
from mil.crossval import run_crossval
from mil.jobs import FAILED, FINISHED, INTERRUPTED, NOT_STARTED, RUNNING, local_jobs, run_status, select_folds

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # One thread, as in this test process (conftest), so floating-point sums match exactly.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _overrides(tmp_path, cohort_overrides, fast_overrides, name):
    return [*cohort_overrides, *fast_overrides, "train.max_epochs=2", f"output_dir={tmp_path / name}"]


def _pooled(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})


def test_parallel_fold_jobs_equal_a_sequential_run(tmp_path, cohort_overrides, fast_overrides):
    """Three `--fold K` processes started together on one folder pool to the sequential run's predictions."""
    sequential = run_crossval(load_config(_overrides(tmp_path, cohort_overrides, fast_overrides, "seq")))
    items = _overrides(tmp_path, cohort_overrides, fast_overrides, "par")
    procs = [
        subprocess.Popen([sys.executable, "-m", "mil", "crossval", *items, "--fold", str(k)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k in range(3)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)
    out = tmp_path / "par"
    assert (out / "splits.yaml").read_text() == (sequential / "splits.yaml").read_text()
    pd.testing.assert_frame_equal(_pooled(out), _pooled(sequential), check_exact=True)
    assert (out / "metrics.json").read_text() == (sequential / "metrics.json").read_text()
    # Exactly one job wrote the pooled results; the others reported the run as incomplete or current.
    assert sum("auroc" in log.lower() and "results in" in log for log in logs) == 1, "\n\n".join(logs)
    status = run_status(out)
    assert status.pooled and [f.state for f in status.folds] == [FINISHED] * 3


def test_cv_jobs_trains_folds_in_several_processes_with_the_sequential_result(tmp_path, cohort_overrides, fast_overrides,
                                                                              monkeypatch, caplog):
    """`cv.jobs=2`: this process and a spawned one share out the folds; the pooled run equals a sequential one."""
    sequential = run_crossval(load_config([*_overrides(tmp_path, cohort_overrides, fast_overrides, "seq"), "cv.jobs=1"]))
    import mil.crossval

    run_fold = mil.crossval.run_fold

    def run_fold_once_a_worker_has_a_fold(cfg, cohort, fold, fold_dir, seed):
        # Tiny folds finish before a process has started: hold fold_0 until the worker takes fold_1.
        deadline = time.monotonic() + 120
        while fold.name == "fold_0" and not (fold_dir.parent / ".locks" / "fold_1.owner").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return run_fold(cfg, cohort, fold, fold_dir, seed)

    monkeypatch.setattr(mil.crossval, "run_fold", run_fold_once_a_worker_has_a_fold)  # this process only
    with caplog.at_level(logging.INFO):
        out = run_crossval(load_config([*_overrides(tmp_path, cohort_overrides, fast_overrides, "par"), "cv.jobs=2"]))
    # The worker's log records are logged here, as if its folds had been trained in this process.
    relayed = [r for r in caplog.records if r.process != os.getpid()]
    assert any(r.name == "mil.crossval" and "fold_1 (2/3)" in r.getMessage() for r in relayed), caplog.text
    pd.testing.assert_frame_equal(_pooled(out), _pooled(sequential), check_exact=True)
    assert (out / "metrics.json").read_text() == (sequential / "metrics.json").read_text()
    owners = {(out / ".locks" / f"fold_{k}.owner").read_text().split(" pid ")[1].split()[0] for k in range(3)}
    assert len(owners) == 2 and str(os.getpid()) in owners  # both processes trained folds
    saved = load_config([str(out / "config.yaml")])
    assert saved.cv.jobs == 2  # the workers leave the run's config as the user gave it
    assert run_status(out).pooled


def test_a_worker_whose_parent_has_gone_starts_no_fold(tmp_path, cohort_overrides, fast_overrides, monkeypatch):
    import mil.crossval
    from mil.splits import load_splits

    cfg = load_config(_overrides(tmp_path, cohort_overrides, fast_overrides, "run"))
    out, n_folds = mil.crossval.prepare_crossval(cfg)
    cohort, task = mil.crossval.load_inputs(cfg)
    folds = load_splits(out / "splits.yaml", set(cohort.patient_ids.tolist()))
    started = []
    monkeypatch.setattr(mil.crossval, "run_fold", lambda cfg, cohort, fold, *a, **kw: started.append(fold.name))
    mil.crossval._train_folds(cfg, cohort, task, folds, out, range(n_folds), wait=False, parent=-1)
    assert started == []
    mil.crossval._train_folds(cfg, cohort, task, folds, out, range(n_folds), wait=False, parent=os.getppid())
    assert started == [f.name for f in folds]


def test_a_process_with_no_fold_left_trains_inner_models_of_a_running_fold(tmp_path, cohort_overrides, fast_overrides,
                                                                          caplog):
    """`cv.jobs` with averaged inner models: a process that finds every fold taken trains the inner models of a
    fold another process holds; that fold's process loads them, and the run equals a sequential one.
    A rerun of the fold loads the inner models finished on the same data and retrains one whose seed changed."""
    import json

    import mil.crossval
    from mil.jobs import fold_job
    from mil.splits import load_splits

    ensemble = ["cv.inner_folds=3", "train.max_epochs=2"]
    sequential = run_crossval(load_config([*_overrides(tmp_path, cohort_overrides, fast_overrides, "seq"), *ensemble]))
    cfg = load_config([*_overrides(tmp_path, cohort_overrides, fast_overrides, "par"), *ensemble])
    out, _ = mil.crossval.prepare_crossval(cfg)
    cohort, task = mil.crossval.load_inputs(cfg)
    folds = load_splits(out / "splits.yaml", set(cohort.patient_ids.tolist()))
    members = [out / "fold_1" / f"inner_{j}" / "member.json" for j in range(3)]
    worker_cfg = load_config([str(out / "config.yaml"), "trainer.enable_progress_bar=false"])  # as a worker reads it
    with caplog.at_level(logging.INFO), fold_job(out, "fold_1"):  # fold_1 is running elsewhere
        mil.crossval._train_folds(worker_cfg, cohort, task, folds, out, [1], wait=False)
    assert all(m.is_file() for m in members), caplog.text  # this process trained all three, the last first
    helped = [r.getMessage() for r in caplog.records if "for the process that holds it" in r.getMessage()]
    assert helped and "inner model 3/3" in helped[0], helped
    assert not (out / "fold_1" / "predictions.csv").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_crossval(cfg)
    assert sum("as it would be now; loaded" in r.getMessage() for r in caplog.records) == 3, caplog.text
    pd.testing.assert_frame_equal(_pooled(out), _pooled(sequential), check_exact=True)

    saved = json.loads(members[0].read_text())
    saved["record"]["seed"] += 1
    members[0].write_text(json.dumps(saved))
    (out / "fold_1" / "predictions.csv").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_crossval(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("loaded" in m and "inner model" in m for m in messages) == 2, messages
    assert any("inner_0 was trained otherwise than now (another seed)" in m for m in messages), messages
    pd.testing.assert_frame_equal(_pooled(out), _pooled(sequential), check_exact=True)

    # An interrupted fold rerun with another config (allowed: no fold had finished) retrains its inner models.
    (out / "fold_1" / "predictions.csv").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        mil.crossval._train_folds(load_config([*_overrides(tmp_path, cohort_overrides, fast_overrides, "par"), *ensemble,
                                               "train.lr=1e-3"]), cohort, task, folds, out, [1], wait=True)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("was trained otherwise than now (config train.lr:" in m and "-> 0.001)" in m for m in messages) == 3, messages


@pytest.mark.parametrize(
    ("setting", "n_units", "work", "on_cpu", "cores", "expected"),
    [
        ("auto", 5, 7e8, True, 2, 2),  # CPU: a process per core (near_normal_120: 7e8 tile-features a fold)
        ("auto", 5, 7e8, True, 16, 5),  # no more processes than units of work (folds, or inner models)
        ("auto", 15, 7e8, True, 16, 8),  # 5 folds x 3 inner models
        ("auto", 25, 7e8, True, 64, 8),  # each process holds its own bag cache
        ("auto", 5, 7e8, False, 16, 1),  # a GPU: one process at a time
        ("auto", 5, 1e6, True, 16, 1),  # tiny folds: starting processes costs more than it saves
        ("auto", 1, 7e8, True, 16, 1),
        ("auto", 5, 7e8, True, 1, 1),
        (3, 5, 10, False, 1, 3),  # a number is taken as given, up to the folds left
        (8, 2, 10, True, 2, 2),
    ],
)
def test_local_jobs_resolves_cv_jobs(setting, n_units, work, on_cpu, cores, expected):
    assert local_jobs(setting, n_units, work, on_cpu, cores) == expected


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, True])
def test_local_jobs_refuses_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="cv.jobs"):
        local_jobs(bad, 5, 3000, True, 2)


def test_fold_selection_then_plain_run_only_pools(tmp_path, cohort_overrides, fast_overrides, monkeypatch):
    cfg = load_config(_overrides(tmp_path, cohort_overrides, fast_overrides, "run"))
    out = run_crossval(cfg, folds=[2, 0])
    status = run_status(out)
    assert [f.state for f in status.folds] == [FINISHED, NOT_STARTED, FINISHED] and not status.pooled
    assert not (out / "predictions.csv").exists()
    run_crossval(cfg, folds=[1])  # the last fold pools
    assert run_status(out).pooled
    pooled = _pooled(out)
    (out / "predictions.csv").unlink()

    import mil.crossval

    def no_training(*a, **kw):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(mil.crossval, "run_fold", no_training)
    run_crossval(cfg)  # every fold finished: only pools
    pd.testing.assert_frame_equal(_pooled(out), pooled, check_exact=True)


def test_fold_index_out_of_range_names_the_valid_range():
    assert select_folds(4, None) == [0, 1, 2, 3]
    assert select_folds(4, [3, 1, 3]) == [3, 1]
    with pytest.raises(ValueError, match=r"--fold 4, 7: the run has 4 folds, numbered 0 to 3"):
        select_folds(4, [0, 4, 7])


def test_fold_job_with_a_different_config_is_refused(tmp_path, cohort_overrides, fast_overrides):
    items = _overrides(tmp_path, cohort_overrides, fast_overrides, "run")
    run_crossval(load_config(items), folds=[0])
    with pytest.raises(ConfigError, match=r"train.lr"):
        run_crossval(load_config([*items, "train.lr=1e-2"]), folds=[1])
    # Where and how jobs run is not part of the result: launcher.* may differ.
    run_crossval(load_config([*items, "launcher.cpus=2", "launcher.partition=gpu"]), folds=[1])


def test_status_reports_failed_running_and_interrupted_folds(tmp_path, cohort_overrides, fast_overrides, monkeypatch):
    import mil.crossval

    cfg = load_config(_overrides(tmp_path, cohort_overrides, fast_overrides, "run"))

    def broken(cfg, cohort, fold, fold_dir, seed):
        fold_dir.mkdir(parents=True, exist_ok=True)
        raise RuntimeError(f"CUDA out of memory in {fold.name}")

    monkeypatch.setattr(mil.crossval, "run_fold", broken)
    with pytest.raises(RuntimeError):
        run_crossval(cfg, folds=[1])
    monkeypatch.undo()
    out = run_crossval(cfg, folds=[0])
    (out / "fold_2").mkdir()  # started by a job that was killed
    status = run_status(out)
    assert [f.state for f in status.folds] == [FINISHED, FAILED, INTERRUPTED]
    assert status.folds[1].detail == "RuntimeError: CUDA out of memory in fold_1"
    # A fold whose lock another process holds is running.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(60)", str(out / ".locks" / "fold_2.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_status(out).folds[2].state == RUNNING
        (out / "fold_2" / "inner_1").mkdir()
        (out / "fold_2" / "inner_1" / "member.json").write_text("{}")
        assert run_status(out).folds[2].detail.endswith("; 1 inner model(s) finished")
    finally:
        holder.kill()
        holder.wait()
    assert run_status(out).folds[2].state == INTERRUPTED
    text = run_status(out).table()
    assert "1 finished, 1 failed, 1 interrupted" in text and "CUDA out of memory" in text
    # The CLI prints the same table.
    from mil.cli import main

    assert main(["status", str(out)]) == 0
    assert main(["status", str(tmp_path / "nothing")]) == 2


def test_submitit_local_launcher(tmp_path, cohort_overrides, fast_overrides):
    """`--launcher local`: submitit's local executor runs one process per fold, then the launcher pools."""
    pytest.importorskip("submitit")
    from mil.launch import launch_crossval

    items = _overrides(tmp_path, cohort_overrides, fast_overrides, "run")
    old = os.environ.get("PYTHONPATH")
    os.environ.update({k: v for k, v in _env().items() if k in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    try:
        out = launch_crossval(load_config([*items, "launcher.cpus=1", "launcher.time=10"]), "local")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    status = run_status(out)
    assert status.pooled and [f.state for f in status.folds] == [FINISHED] * 3
    assert len(_pooled(out)) == 30
    assert len(list((out / "jobs").glob("*/*_log.out"))) == 3  # one submitit job per fold
