"""`mil crossval` and `mil train`: runs from a config to a folder of models and results.

A run folder holds ``config.yaml`` (the resolved config, enough to rerun), ``run.yaml``
(what prediction needs: task type, label columns and class order, feature dimension, encoder
identity), ``skipped.csv``,
and for cross-validation ``splits.yaml``, ``fold_<k>/`` and the pooled results. A fold is
finished when its ``predictions.csv`` exists (written last, atomically); a rerun into the
same folder keeps finished folds whose ``provenance.json`` (:mod:`mil.provenance`) still matches
the data, and redoes interrupted folds and folds computed from other data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mil import __version__
from mil.bags import read_bag_info
from mil.cohort import Bag, Cohort, load_cohort
from mil.config import (
    ConfigError,
    config_changes,
    flat_config,
    load_config,
    require,
    save_config,
    usable_cores,
)
from mil.covariates import CovariateEncoder, encode_split, read_covariates
from mil.ensemble import choose_on_inner_folds, help_running_fold, inner_ensemble, inner_parts
from mil.fitting import FoldModel, fit_model, load_model, model_files, saved_encoder
from mil.inference import resolve_device
from mil.io import atomic_path, write_json, write_text
from mil.jobs import (
    RESULT_FREE_KEYS,
    LogsToParent,
    fold_job,
    local_jobs,
    pooled_is_current,
    relay_logs,
    run_lock,
    run_status,
    select_folds,
)
from mil.progress import LOG_DATEFMT, LOG_FORMAT, quiet_lightning
from mil.provenance import (
    check_bags_finite,
    finished_work,
    fold_record,
    read_record,
    record_changes,
    split_changes,
    split_record,
    write_record,
)
from mil.report import write_report
from mil.slide_scores import pool_fold_slide_predictions, write_slide_predictions
from mil.splits import (
    Fold,
    SplitError,
    inner_split,
    load_splits,
    make_splits,
    save_splits,
)
from mil.tables import ONLY_EMPTY_IS_MISSING
from mil.tasks import Task, create_task, task_class, task_from_meta
from mil.thresholds import record_in_run, validation_threshold
from mil.training import budget_epochs

logger = logging.getLogger(__name__)

_REQUIRED = ["cohort.features_dir"]  # and a table: cohort.slide_csv and/or cohort.clinical_csv (load_cohort)


def is_main_process() -> bool:
    return rank_zero_only.rank == 0


def _check_resumable(cfg: DictConfig, out: Path) -> None:
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    # No finished fold or model (e.g. a run that failed on a typo): nothing to protect. Inner models an
    # interrupted fold left are reused only where their record (patients, files, config, seed) matches.
    if not finished_work(out):
        logger.info("%s holds no finished folds or models: starting it again with this config", out)
        return
    saved, now = flat_config(load_config(base=OmegaConf.load(saved_path))), flat_config(cfg)
    diff = config_changes(saved, now, ignore=RESULT_FREE_KEYS)
    if diff:
        details = ", ".join(diff[:5])
        raise ConfigError(
            f"output_dir {out} holds a run with a different config ({details}); "
            "use a new output_dir, or delete the old run to start over"
        )


def load_inputs(cfg: DictConfig) -> tuple[Cohort, Task]:
    """The cohort (bags, labels, covariates) and the task of ``cfg``; writes nothing."""
    cls = task_class(cfg)
    cohort = load_cohort(cfg.cohort, columns=cls.label_columns(cfg))
    cohort.covariates = read_covariates(cfg.cohort, cohort.bags)
    if cfg.cv.ablation and cohort.covariates is None:
        raise ConfigError("cv.ablation=true compares slide, covariates and both: name cohort.covariates.numeric/categorical")
    return cohort, cls(cohort.columns, cfg)


def check_inner_folds(cfg: DictConfig) -> None:
    """``cv.inner_folds``: 0 (one validation split), or 2 or more; choosing the refit's epoch on them needs one process."""
    k = cfg.cv.inner_folds
    problems = []
    if k == 1 or k < 0:
        problems.append(f"cv.inner_folds must be 0 (one validation split, cv.val_fraction) or at least 2, got {k}")
    if k and cfg.train.refit and cfg.trainer.devices not in (1, "1"):
        problems.append(f"cv.inner_folds with train.refit=true trains on one device; got trainer.devices="
                        f"{cfg.trainer.devices} (train.refit=false keeps the inner models, on any number of devices)")
    if problems:
        raise ConfigError("; ".join(problems))


def prepare_run(cfg: DictConfig, kind: str) -> tuple[Path, Cohort, Task]:
    """Validate the config, load the cohort and write the run's metadata files."""
    require(cfg, _REQUIRED + task_class(cfg).required_keys(cfg), kind)
    check_inner_folds(cfg)
    out = Path(cfg.output_dir)
    _check_resumable(cfg, out)
    cohort, task = load_inputs(cfg)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        with atomic_path(out / "skipped.csv") as tmp:
            cohort.skipped.to_csv(tmp, index=False)
        meta = {
            "kind": kind,
            "toolkit_version": __version__,
            **task.metadata(),
            "bag_level": cohort.bag_level,
            "in_dim": cohort.dim,
            "encoder": cohort.identity,
            "extraction": extraction_settings(cohort),
            "model": cfg.model.name,
            "bootstrap": {"n": cfg.cv.bootstrap, "seed": cfg.cv.seed},  # so `mil report` recomputes the same intervals
        }
        write_text(out / "run.yaml", OmegaConf.to_yaml(OmegaConf.create(meta)))
    return out, cohort, task


# Bag attributes `mil predict` needs to embed a new cohort's slides exactly as the training bags.
EXTRACTION_ATTRS = ("encoder", "embedding", "encoder_weights_source", "tile_px", "mpp", "min_tissue", "thumbnail_px")


def extraction_settings(cohort: Cohort) -> dict[str, Any]:
    """How the cohort's bags were made (empty for bags from other tools, which do not record it)."""
    attrs = read_bag_info(cohort.bags[0].paths[0]).attrs
    return {k: attrs[k] for k in EXTRACTION_ATTRS if k in attrs}


def id_columns(cfg: DictConfig) -> list[str]:
    c = cfg.cohort
    return [c.patient_column] + ([c.slide_column] if c.bag_level == "slide" else [])


def predictions_frame(cfg: DictConfig, task: Task, bags: list[Bag], columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per bag: ids, true values (None where unknown) and the task's prediction ``columns``."""
    c = cfg.cohort
    df = pd.DataFrame({c.patient_column: [b.patient_id for b in bags]})
    if c.bag_level == "slide":
        df[c.slide_column] = [b.slide_ids[0] for b in bags]
    for name, values in task.truth(bags).items():
        df[name] = values
    return pd.concat([df, pd.DataFrame(columns, index=df.index)], axis=1)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _train_one(
    cfg: DictConfig, cohort: Cohort, task: Task, train: list[str], val: list[str], out_dir: Path, seed: int, what: str
) -> FoldModel:
    """Train the model of a fold (or of `mil train`) on ``train``, choosing its epoch and call threshold on ``val``.

    Returns the model(s), a summary (with ``threshold``, chosen on validation predictions) and the
    covariate encoder(s) fitted on the training patients (None without covariates). With
    ``train.refit`` the returned model (and encoder) is a new one trained on ``train + val`` for
    the chosen number of epochs; the threshold, warnings and validation values still come from
    the model that was selected on ``val`` (the only predictions of unseen patients). With
    ``cv.inner_folds`` the split is replaced by inner folds of ``train + val``: they choose the
    epoch for the refit (:func:`mil.ensemble.choose_on_inner_folds`), or, without the refit, the inner
    models themselves are kept and averaged (:func:`mil.ensemble.inner_ensemble`). A class with fewer patients than
    ``cv.inner_folds`` lowers the number of inner folds; below 2, ``train``/``val`` are used.
    """
    if cfg.cv.inner_folds:
        dev = sorted([*train, *val])
        parts = inner_parts(cfg, cohort, task, dev, seed, what)
        if parts and not cfg.train.refit:
            return inner_ensemble(cfg, cohort, task, parts, out_dir, seed, what)
        summary = choose_on_inner_folds(cfg, cohort, task, dev, parts, out_dir, seed, what) if parts else None
        if summary is not None:
            model, encoder = _refit(cfg, cohort, task, dev, summary, out_dir, seed, what)
            return FoldModel([model], [encoder], summary)
    model, summary, encoder = fit_model(cfg, cohort, task, train, val, out_dir, seed, what)
    if is_main_process():  # validation predictions only
        val_bags = cohort.subset(set(val))
        x_val = None if encoder is None else encode_split(encoder, cohort.covariates, val_bags, f"{what}, validation")[0]
        summary["threshold"] = validation_threshold(task, model, val_bags, cfg, covariates=x_val)
    if cfg.train.refit:
        model, encoder = _refit(cfg, cohort, task, [*train, *val], summary, out_dir, seed, what)
    return FoldModel([model], [encoder], summary)


def _refit(
    cfg: DictConfig, cohort: Cohort, task: Task, patients: list[str], summary: dict[str, Any], out_dir: Path, seed: int,
    what: str,
) -> tuple[torch.nn.Module, CovariateEncoder | None]:
    """``train.refit``: a new model trained on ``patients`` (all of a fold's training patients) for the epochs
    chosen in ``summary`` (``best_epoch`` + 1), keeping the final weights; adds ``summary["refit"]``."""
    epochs = int(summary["best_epoch"]) + 1
    logger.info("%s: refit on all %d training patients for the chosen %d epochs", what, len(patients), epochs)
    model, refit, encoder = fit_model(cfg, cohort, task, patients, patients, out_dir / "refit", seed,
                                      f"{what} (refit)", fixed_epochs=epochs)  # no validation: only fills the slot
    summary["refit"] = {k: refit[k] for k in ("epochs_run", "steps_run", "n_bags")}
    return model, encoder


def fold_frame(cfg: DictConfig, task: Task, fold: Fold, bags: list[Bag], columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """:func:`predictions_frame` of a fold's test bags, with its ``fold`` (and ``repeat``) column."""
    df = predictions_frame(cfg, task, bags, columns)
    df.insert(len(id_columns(cfg)), "fold", fold.name)
    if cfg.cv.repeats > 1:
        df.insert(len(id_columns(cfg)) + 1, "repeat", fold.repeat)
    return df


def run_fold(cfg: DictConfig, cohort: Cohort, fold: Fold, fold_dir: Path, seed: int) -> pd.DataFrame | None:
    """Train on ``fold.train``, select on ``fold.val``; only then predict ``fold.test``."""
    task = create_task(cfg, cohort.columns)
    trained = _train_one(cfg, cohort, task, fold.train, fold.val, fold_dir, seed, fold.name)
    if cfg.cv.ablation:  # slide-only and covariates-only models of this fold, on every process (DDP)
        from mil.ablation import run_ablation_fold

        run_ablation_fold(cfg, cohort, task, fold, fold_dir, seed, _train_one)
    if not is_main_process():
        return None
    summary = {**trained.summary, "models": trained.save(fold_dir)}
    test_bags = cohort.subset(set(fold.test))
    x_test, imputed = trained.covariates(cohort, test_bags, f"{fold.name}, test")
    if any(x is not None for x in x_test):
        summary.setdefault("covariates_imputed", {})["test"] = imputed[0] if len(imputed) == 1 else imputed
    columns = trained.predictions(cfg, task, test_bags, x_test)
    df = fold_frame(cfg, task, fold, test_bags, {**columns, **task.calls(columns, summary["threshold"])})
    write_slide_predictions(cfg, task, test_bags, trained.models, fold_dir / "slide_predictions.csv",
                            covariates=x_test, fold=fold.name)
    write_json(fold_dir / "summary.json", {**summary, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test)})
    write_record(fold_dir, fold_record(cohort, fold))
    _write_csv(df, fold_dir / "predictions.csv")  # last: marks the fold finished
    return df


def _splits(cfg: DictConfig, cohort: Cohort, task: Task, out: Path) -> list[Fold]:
    """The split file's folds, or splits made afresh from the current cohort (so a rerun on changed
    data gets the splits a new run would get; finished folds whose split changed are redone)."""
    saved = out / "splits.yaml"
    if cfg.cv.split_file:
        folds = load_splits(cfg.cv.split_file, set(cohort.patient_ids.tolist()))
        check_covers_cohort(folds, cohort, f"cv.split_file {cfg.cv.split_file}")
        check_agrees_with_finished(folds, out, f"cv.split_file {cfg.cv.split_file}")
    else:
        strata, names = task.strata(cohort.bags)
        folds = make_splits(cohort.patient_ids, strata, names, cfg.cv.folds, cfg.cv.repeats, cfg.cv.seed, cfg.cv.val_fraction)
    if is_main_process():
        save_splits(folds, saved)
    return folds


def fold_thresholds(out: Path, folds: list[Fold]) -> dict[str, float | None]:
    """Each fold's threshold, from its ``summary.json`` (None for folds from before thresholds)."""
    found = {}
    for fold in folds:
        path = out / fold.name / "summary.json"
        found[fold.name] = json.loads(path.read_text()).get("threshold") if path.is_file() else None
    return found


def check_covers_cohort(folds: list[Fold], cohort: Cohort, source: str) -> None:
    """Every patient of the cohort must be in a test fold of every repeat; raises naming the rest."""
    patients = set(cohort.patient_ids.tolist())
    for repeat in sorted({f.repeat for f in folds}):
        tested = {p for f in folds if f.repeat == repeat for p in f.test}
        missing = sorted(patients - tested)
        if missing:
            where = f" of repeat {repeat}" if len({f.repeat for f in folds}) > 1 else ""
            raise SplitError(
                f"{source}: {len(missing)} of the cohort's {len(patients)} patients are in no test fold{where} "
                f"({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}); they would get no prediction. "
                "Add them to the split file, or leave them out of the cohort tables"
            )


def check_agrees_with_finished(folds: list[Fold], out: Path, source: str) -> None:
    """Refuse splits that differ from those of folds already finished in ``out`` (mixing two partitions)."""
    saved = {str(f["name"]): f for f in OmegaConf.to_container(OmegaConf.load(out / "splits.yaml"))} \
        if (out / "splits.yaml").is_file() else {}
    conflicts = []
    for fold in folds:
        if not (out / fold.name / "predictions.csv").is_file():
            continue
        record = read_record(out / fold.name)
        before = record["split"] if record else saved.get(fold.name)
        if before is None:
            continue
        now = {"train": fold.train, "val": fold.val, "test": fold.test}
        changes = split_changes({k: [str(p) for p in before[k]] for k in ("train", "val", "test")}, now)
        if changes:
            conflicts.append(f"{fold.name}: {'; '.join(changes)}")
    if conflicts:
        raise SplitError(
            f"{source} disagrees with the folds already finished in {out} ({' | '.join(conflicts[:3])}); "
            "resuming would mix two partitions. Use a new output_dir, or delete the finished folds"
        )


def _finished_fold(cfg: DictConfig, cohort: Cohort, task: Task, fold: Fold, fold_dir: Path) -> pd.DataFrame | None:
    """A finished fold's predictions when its record matches the current data; else None (redo it)."""
    done = fold_dir / "predictions.csv"
    if not done.is_file():
        return None
    changes = record_changes(read_record(fold_dir), fold_record(cohort, fold))
    if changes:
        logger.warning("%s was computed from other data than now: %s; redoing it", fold.name, "; ".join(changes))
        if is_main_process():
            done.unlink()  # an interrupted redo must not leave the old fold looking finished
        return None
    logger.info("%s already finished on the same data, keeping it", fold.name)
    return pd.read_csv(done, dtype={**{c: str for c in id_columns(cfg)}, **task.csv_dtypes()}, **ONLY_EMPTY_IS_MISSING)


def prepare_crossval(cfg: DictConfig) -> tuple[Path, int]:
    """Write (or check) a cross-validation's ``config.yaml`` and ``splits.yaml``; returns the folder and fold count."""
    with run_lock(cfg.output_dir):
        out, cohort, task = prepare_run(cfg, "crossval")
        return out, len(_splits(cfg, cohort, task, out))


def run_crossval(cfg: DictConfig, folds: Sequence[int] | None = None) -> Path:
    """Cross-validate ``cfg`` into ``cfg.output_dir``; returns the run folder.

    ``folds``: indices into the list of folds over all repeats (as in ``splits.yaml``) to train
    in this process, for parallel jobs on one folder (:mod:`mil.jobs`); the pooled results are
    written once every fold is finished. ``None``: every fold, then (re)write the pooled results.
    """
    main = is_main_process()
    with run_lock(cfg.output_dir, enabled=main):  # parallel jobs: the first writes config and splits, the others check
        out, cohort, task = prepare_run(cfg, "crossval")
        all_folds = _splits(cfg, cohort, task, out)
        check_bags_finite(cohort, out)
    todo = select_folds(len(all_folds), folds)
    jobs = _fold_processes(cfg, cohort, [all_folds[i] for i in todo], out) if main else 1
    if jobs > 1:
        _train_in_processes(cfg, cohort, task, all_folds, out, todo, jobs)
    else:
        _train_folds(cfg, cohort, task, all_folds, out, todo, wait=True)
    if main:
        pool_results(cfg, out, cohort, task, all_folds, force=folds is None)
    return out


def _train_folds(
    cfg: DictConfig, cohort: Cohort, task: Task, all_folds: list[Fold], out: Path, indices: Sequence[int], wait: bool,
    parent: int | None = None,
) -> None:
    """Train the folds ``indices`` that are not finished; ``wait=False``: skip folds another process holds, and
    once every fold is taken, train inner models of the folds others hold (:func:`mil.ensemble.help_running_fold`).

    ``parent``: a worker's parent process id; once the parent has gone (killed, interrupted),
    no further fold is started.
    """
    for i in indices:
        if parent is not None and os.getppid() != parent:
            logger.warning("the process that started this worker has ended; not starting another fold")
            return
        fold = all_folds[i]
        fold_dir = out / fold.name
        with fold_job(out, fold.name, enabled=is_main_process(), wait=wait) as mine:
            if not mine or _finished_fold(cfg, cohort, task, fold, fold_dir) is not None:
                continue
            logger.info("%s (%d/%d): %d train, %d val, %d test patients", fold.name, i + 1, len(all_folds), len(fold.train), len(fold.val), len(fold.test))
            run_fold(cfg, cohort, fold, fold_dir, seed=cfg.train.seed + i)
    if not wait:  # cv.jobs: every fold is taken; train inner models of those other processes are training
        for i in indices:
            if parent is not None and os.getppid() != parent:
                return
            help_running_fold(cfg, cohort, task, all_folds[i], out / all_folds[i].name, cfg.train.seed + i)


def _planned_work(cfg: DictConfig, cohort: Cohort, fold: Fold) -> float:
    """Tile-features a fold plans to train on: optimiser steps (the budget or the inner folds', plus the refit's) x
    tiles per step x feature width, counting a patient as one bag of the cohort's mean size
    (an estimate to decide whether processes are worth starting)."""
    t = cfg.train

    def steps(n_bags: int) -> int:
        return budget_epochs(n_bags, t.batch_size, t.max_epochs, t.min_steps) * math.ceil(n_bags / t.batch_size)

    n_dev, k = len(fold.train) + len(fold.val), cfg.cv.inner_folds
    first = k * steps(n_dev * (k - 1) // k) if k else steps(len(fold.train))  # the fit(s) that choose the epoch
    n_steps = first + (steps(n_dev) if t.refit else 0)
    tiles = float(np.mean([b.n_tiles for b in cohort.bags])) if cohort.bags else 0.0
    return n_steps * t.batch_size * min(tiles, t.bag_size or tiles) * cohort.dim


def _fold_processes(cfg: DictConfig, cohort: Cohort, folds: list[Fold], out: Path) -> int:
    """``cv.jobs`` resolved for the folds of this call that are not finished (:func:`mil.jobs.local_jobs`)."""
    left = [f for f in folds if not (out / f.name / "predictions.csv").is_file()]
    on_cpu = resolve_device(cfg.trainer.accelerator).type == "cpu" and str(cfg.trainer.devices) in ("1", "auto")
    members = cfg.cv.inner_folds if cfg.cv.inner_folds and not cfg.train.refit else 1  # each one a unit of work
    return local_jobs(cfg.cv.jobs, len(left) * members, min((_planned_work(cfg, cohort, f) for f in left), default=0), on_cpu)


def _train_in_processes(
    cfg: DictConfig, cohort: Cohort, task: Task, all_folds: list[Fold], out: Path, indices: Sequence[int], jobs: int,
) -> None:
    """Train folds in ``jobs`` processes at once: this one and ``jobs - 1`` worker processes.

    Each process takes the next fold nobody holds (the fold locks of :mod:`mil.jobs`), and once
    none is left trains inner models of folds others hold (:func:`mil.ensemble.help_running_fold`), with
    ``cores // jobs`` torch threads, and logs one line per epoch (progress bars of several
    processes would overwrite each other). Every fold keeps its own seed, so the results are
    those of a sequential run. A fold left unfinished (a worker failed or was killed, or a
    ``--fold`` job elsewhere holds it) is then waited for or trained here, as a sequential run
    would, so its error, if any, is raised in this process. Workers are new interpreters
    (``python -c``), not ``multiprocessing`` children: those re-run the caller's script, which
    in a research script is rarely behind ``if __name__ == "__main__"``.
    """
    threads = max(1, usable_cores() // jobs)
    run_cfg = cfg.copy()
    run_cfg.trainer.enable_progress_bar = False
    logger.info("training %d folds in %d processes (cv.jobs=%s), %d torch thread(s) each%s", len(indices), jobs,
                cfg.cv.jobs, threads, "; a process with no fold left trains inner models of the others'"
                if cfg.cv.inner_folds and not cfg.train.refit else "")
    # Workers send every record this process would log; it logs them as its own (mil.jobs.relay_logs).
    level = min(logging.getLogger().getEffectiveLevel(), logging.getLogger("mil").getEffectiveLevel())
    code = (f"from mil.crossval import fold_worker; "
            f"fold_worker({str(out)!r}, {list(indices)!r}, {threads}, {level}, {os.getpid()})")
    package_root = str(Path(__file__).resolve().parents[1])  # the worker imports this copy of mil
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    workers = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(jobs - 1)]
    relays = [relay_logs(w.stdout) for w in workers]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _train_folds(run_cfg, cohort, task, all_folds, out, indices, wait=False)
    except BaseException:
        for w in workers:  # their folds are left interrupted; a rerun redoes them
            w.terminate()
        raise
    finally:
        for w in workers:
            w.wait()
        for r in relays:
            r.join()
        torch.set_num_threads(threads_before)
    unfinished = [i for i in indices if not (out / all_folds[i].name / "predictions.csv").is_file()]
    if unfinished:  # a worker died or failed, or a `--fold` job elsewhere holds the fold: as a sequential run would
        status = {f.name: f for f in run_status(out).folds}
        for i in unfinished:
            name = all_folds[i].name
            logger.warning("%s did not finish in a worker process (%s%s); waiting for it or training it here", name,
                           status[name].state, f": {status[name].detail}" if status[name].detail else "")
        _train_folds(cfg, cohort, task, all_folds, out, unfinished, wait=True)


def fold_worker(run_dir: str, indices: list[int], threads: int, log_level: int, parent: int | None = None) -> None:
    """Body of a worker process of ``cv.jobs``: train the listed folds of ``run_dir`` that no process holds,
    then inner models of those other processes hold.

    Reads the run's ``config.yaml`` and ``splits.yaml`` (written by the parent) and writes only
    fold folders; the parent pools. Log records go to the parent as JSON lines on stdout. Once
    the ``parent`` process has gone, no further fold is started.
    """
    handler = LogsToParent()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    logging.basicConfig(level=log_level, handlers=[handler], force=True)
    quiet_lightning()
    torch.set_num_threads(threads)
    out = Path(run_dir)
    cfg = load_config([str(out / "config.yaml"), "trainer.enable_progress_bar=false"])
    cohort, task = load_inputs(cfg)
    all_folds = load_splits(out / "splits.yaml", set(cohort.patient_ids.tolist()))
    _train_folds(cfg, cohort, task, all_folds, out, indices, wait=False, parent=parent)


def pool_results(cfg: DictConfig, out: Path, cohort: Cohort, task: Task, folds: list[Fold], force: bool = True) -> bool:
    """Write the pooled ``predictions.csv``, ``metrics.json``, ``summary.md`` and plots from the folds' predictions.

    Only when every fold is finished; returns whether the pooled results are now current. Without
    ``force`` they are written only when older than a fold's predictions, so of several jobs that
    finish together one writes them. Every fold is read from its CSV, so a resumed or parallel run
    pools exactly what a sequential one does.
    """
    with run_lock(out):
        missing = [f.name for f in folds if not (out / f.name / "predictions.csv").is_file()]
        if missing:
            logger.info("%d of %d folds finished; the pooled results are written when the last one is (waiting: %s)",
                        len(folds) - len(missing), len(folds), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
            return False
        if not force and pooled_is_current(out, [f.name for f in folds]):
            logger.info("pooled results in %s are current", out)
            return True
        dtypes = {**{c: str for c in id_columns(cfg)}, **task.csv_dtypes()}
        predictions = pd.concat([pd.read_csv(out / f.name / "predictions.csv", dtype=dtypes, **ONLY_EMPTY_IS_MISSING) for f in folds],
                                ignore_index=True)
        record_in_run(out, cfg, task, fold_thresholds(out, folds))
        pool_fold_slide_predictions(out, [f.name for f in folds])
        _write_csv(predictions, out / "predictions.csv")
        result = write_report(predictions, task.columns[0].name, cohort.classes, out, id_columns(cfg),
                              n_boot=cfg.cv.bootstrap, seed=cfg.cv.seed, task=task)
        append_training_health(out, [f.name for f in folds])
        if cfg.cv.ablation:  # slide-only and covariates-only arms beside the fused model (mil.ablation)
            from mil.ablation import report_ablation

            report_ablation(cfg, task, out, folds, predictions)
    logger.info("%s; results in %s", task.headline(result), out)
    return True


def append_training_health(out: Path, fold_names: list[str]) -> None:
    """Add each fold's kept epoch and training warnings (from its ``summary.json``) to ``summary.md``.

    A fold whose kept model is from the first epochs, or whose validation AUROC is at chance,
    is named there, so a pooled metric is never read without knowing that some folds barely trained.
    """
    lines = ["", "## Training", "", "| fold | kept epoch | epochs run | refit: epochs on bags | warnings |",
             "|---|---|---|---|---|"]
    flagged = refitted = inner = 0
    ensemble = False

    def cell(value: Any) -> str:  # an inner ensemble's epochs are one per model
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

    for name in fold_names:
        path = out / name / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        warnings = s.get("warnings", [])
        flagged += bool(warnings)
        refit = s.get("refit")
        refitted += refit is not None
        inner = max(inner, s.get("inner_folds", {}).get("k", 0))
        ensemble |= bool(s.get("inner_folds", {}).get("ensemble"))
        refit_cell = f"{refit['epochs_run']} on {refit['n_bags']}" if refit else "—"
        lines.append(f"| {name} | {cell(s.get('best_epoch'))} | {cell(s.get('epochs_run'))} | {refit_cell} | "
                     f"{'; '.join(warnings) or '—'} |")
    if ensemble:  # the test folds were predicted by the average of k models
        lines[2:2] = [f"Each fold predicts with the average of {inner} inner models (`cv.inner_folds`, no refit): "
                      f"each trained on {inner - 1} of {inner} parts of the fold's training patients and kept its "
                      "epoch on the remaining part; kept epochs are listed per inner model.", ""]
    elif inner:  # the test folds were predicted by models trained on every training patient
        lines[2:2] = [f"Each fold's epoch was chosen on the validation curve averaged over {inner} inner folds of its "
                      "training patients (`cv.inner_folds`), then a model was trained on all of them for that many "
                      "epochs; kept epochs and warnings describe the averaged curve.", ""]
    elif refitted:  # the test folds were predicted by the refit models; the warnings describe the selected ones
        lines[2:2] = [f"Each of {refitted} folds was refit on its training + validation patients for the kept epochs "
                      "(`train.refit`); kept epochs and warnings describe the model selected on validation.", ""]
    if flagged:
        lines[2:2] = [f"**{flagged} of {len(fold_names)} folds may not have learnt** (see the warnings below).", ""]
    summary = out / "summary.md"
    text = summary.read_text() if summary.is_file() else ""
    write_text(summary, text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def run_train(cfg: DictConfig) -> Path:
    """Train the final model on the whole cohort, as a fold's is trained on its training patients: by default
    the ``cv.inner_folds`` inner models, averaged (``cv.inner_folds=0``: one stratified validation split picks
    the epoch). ``summary.json``, written last, lists the weight files (see :func:`mil.fitting.model_files`)."""
    out, cohort, task = prepare_run(cfg, "train")
    train, val = inner_split(cohort.patient_ids, task.strata(cohort.bags)[0], cfg.cv.val_fraction, seed=cfg.cv.seed)
    record = split_record(cohort, {"train": train, "val": val})
    files = list(model_files(out).values())
    if (out / "summary.json").is_file() and all(f.is_file() for f in files):
        changes = record_changes(read_record(out), record)
        if not changes:
            logger.info("%s exists and was trained on the same data; this run is finished", files[0])
            return out
        logger.warning("%s was trained on other data than now: %s; training again", files[0], "; ".join(changes))
    if is_main_process():  # an interrupted retraining must not leave the old model looking finished
        (out / "summary.json").unlink(missing_ok=True)
    check_bags_finite(cohort, out)
    if is_main_process():
        save_splits([Fold("final", 0, 0, train, val, [])], out / "splits.yaml")
    trained = _train_one(cfg, cohort, task, train, val, out, cfg.train.seed, "the final model")
    if is_main_process():
        record_in_run(out, cfg, task, {"model": trained.summary["threshold"]})
        write_record(out, record)
        models = trained.save(out)
        write_json(out / "summary.json", {**trained.summary, "models": models, "n_train": len(train), "n_val": len(val)})
    return out  # summary.json last: it marks the run finished and lists its models


def load_run_model(run_dir: str | Path, weights: str | Path) -> torch.nn.Module:
    """Rebuild a run's network from its ``config.yaml`` / ``run.yaml`` and load ``weights``.

    A run trained with covariates gets its fold's encoder as ``model.covariate_encoder``
    (:class:`~mil.covariates.CovariateEncoder`, from ``covariates.json`` beside the weights); else None.
    """
    run_dir = Path(run_dir)
    cfg = load_config(base=OmegaConf.load(run_dir / "config.yaml"))
    meta = OmegaConf.load(run_dir / "run.yaml")
    task = task_from_meta(meta, cfg)
    encoder = saved_encoder(cfg, weights)
    model = load_model(cfg, task, int(meta.in_dim), weights, encoder)
    model.covariate_encoder = encoder
    return model
