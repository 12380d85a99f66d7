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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from mil import __version__
from mil.bags import read_bag_info
from mil.cohort import Bag, Cohort, load_cohort
from mil.config import ConfigError, load_config, require, save_config, usable_cores
from mil.covariates import CovariateEncoder, configured, encode_split, encoder_path, fit_fold, read_covariates
from mil.fusion import CovariateFusion, warm_start_late_fusion
from mil.inference import load_weights, predict_outputs, resolve_device, save_weights
from mil.io import atomic_path, write_json, write_text
from mil.jobs import (
    LAUNCHER_KEYS,
    LogsToParent,
    fold_job,
    local_jobs,
    pooled_is_current,
    relay_logs,
    run_lock,
    run_status,
    select_folds,
)
from mil.models import create_model
from mil.normalize import Standardized
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
    inner_fold_count,
    inner_folds,
    inner_split,
    load_splits,
    make_splits,
    save_splits,
)
from mil.tables import ONLY_EMPTY_IS_MISSING
from mil.tasks import Task, create_task, task_class, task_from_meta
from mil.thresholds import record_in_run, validation_threshold
from mil.training import (
    ValidationRecord,
    best_smoothed_epoch,
    budget_epochs,
    first_eligible_epoch,
    fit,
    resolve_selection,
    training_warnings,
)

logger = logging.getLogger(__name__)

# Keys that do not change results: a resumed run may differ in these.
_RESUME_FREE = {"output_dir", "trainer.enable_progress_bar", "trainer.logger", "train.num_workers", "cv.split_file"} | LAUNCHER_KEYS
_REQUIRED = ["cohort.features_dir"]  # and a table: cohort.slide_csv and/or cohort.clinical_csv (load_cohort)


def is_main_process() -> bool:
    return rank_zero_only.rank == 0


def _flat(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _check_resumable(cfg: DictConfig, out: Path) -> None:
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    if not finished_work(out):  # e.g. a run that failed on a typo: nothing to protect
        logger.info("%s holds no finished folds or models: starting it again with this config", out)
        return
    saved, now = _flat(load_config(base=OmegaConf.load(saved_path))), _flat(cfg)
    diff = {k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)} - _RESUME_FREE
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(diff)[:5])
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


def build_model(cfg: DictConfig, in_dim: int, n_outputs: int, n_covariates: int = 0) -> torch.nn.Module:
    """The configured aggregator, fused with ``n_covariates`` encoded covariates (``model.fusion``)
    when there are any, and wrapped in :class:`Standardized` when ``train.standardize``."""
    model = create_model(cfg.model.name, in_dim, n_outputs, **OmegaConf.to_container(cfg.model.args))
    if n_covariates:
        model = CovariateFusion(model, n_covariates, cfg.model.fusion)
    return Standardized(model, in_dim) if cfg.train.standardize else model


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


MODEL_FILE = "model.safetensors"


def model_files(folder: str | Path) -> dict[str, Path]:
    """The weight files a fold folder (or a `mil train` run folder) predicts with, by name.

    ``{"": folder/model.safetensors}`` for one model; ``{"inner_<j>": folder/inner_<j>/model.safetensors}``
    for the averaged inner models of ``cv.inner_folds`` (listed under ``models`` in the folder's
    ``summary.json``, which runs from before the list lack). The files may not exist yet.
    """
    folder = Path(folder)
    summary = folder / "summary.json"
    names = json.loads(summary.read_text()).get("models") if summary.is_file() else None
    return {str(Path(n).parent) if Path(n).parent != Path(".") else "": folder / n for n in names or [MODEL_FILE]}


@dataclass
class FoldModel:
    """What a fold (or `mil train`) predicts with: one model, or several whose predictions are averaged.

    ``encoders[i]``: model i's clinical covariate encoder (None without covariates). ``summary``:
    as :func:`mil.training.fit`'s, plus ``threshold`` (chosen on validation predictions).
    """

    models: list[torch.nn.Module]
    encoders: list[CovariateEncoder | None]
    summary: dict[str, Any]

    def save(self, folder: Path) -> list[str]:
        """Write each model's weights (and covariate encoder) into ``folder``; returns their paths relative to it
        (``model.safetensors``, or ``inner_<j>/model.safetensors`` for several), for ``summary.json`` → ``models``."""
        names = [MODEL_FILE] if len(self.models) == 1 else [f"inner_{j}/{MODEL_FILE}" for j in range(len(self.models))]
        for name, model, encoder in zip(names, self.models, self.encoders, strict=True):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if encoder is not None:
                encoder.save(encoder_path(path))
            save_weights(model, path)
        return names

    def covariates(self, cohort: Cohort, bags: list[Bag], what: str) -> tuple[list[np.ndarray | None], list[Any]]:
        """Each model's encoded covariates [n_bags, C] of ``bags`` (None without covariates) and what it imputed."""
        encoded = [None if e is None else encode_split(e, cohort.covariates, bags, what) for e in self.encoders]
        return [None if e is None else e[0] for e in encoded], [None if e is None else e[1] for e in encoded]

    def predictions(self, cfg: DictConfig, task: Task, bags: list[Bag], covariates: list[np.ndarray | None]
                    ) -> dict[str, np.ndarray]:
        """The task's prediction columns of ``bags``, averaged over the models (as `mil predict` averages a run's)."""
        device = resolve_device(cfg.trainer.accelerator)
        per_model = [task.predictions(predict_outputs(model, bags, cfg.train.eval_batch_size, device, cfg.train.precision,
                                                      covariates=x))
                     for model, x in zip(self.models, covariates, strict=True)]
        if len(per_model) == 1:
            return per_model[0]
        return {c: np.mean([p[c] for p in per_model], axis=0) for c in per_model[0]}


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
    epoch for the refit (:func:`_choose_on_inner_folds`), or, without the refit, the inner models
    themselves are kept and averaged (:func:`_inner_ensemble`). A class with fewer patients than
    ``cv.inner_folds`` lowers the number of inner folds; below 2, ``train``/``val`` are used.
    """
    if cfg.cv.inner_folds:
        dev = sorted([*train, *val])
        parts = _inner_parts(cfg, cohort, task, dev, seed, what)
        if parts and not cfg.train.refit:
            return _inner_ensemble(cfg, cohort, task, parts, out_dir, seed, what)
        summary = _choose_on_inner_folds(cfg, cohort, task, dev, parts, out_dir, seed, what) if parts else None
        if summary is not None:
            model, encoder = _refit(cfg, cohort, task, dev, summary, out_dir, seed, what)
            return FoldModel([model], [encoder], summary)
    model, summary, encoder = _fit_model(cfg, cohort, task, train, val, out_dir, seed, what)
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
    model, refit, encoder = _fit_model(cfg, cohort, task, patients, patients, out_dir / "refit", seed,
                                       f"{what} (refit)", fixed_epochs=epochs)  # no validation: only fills the slot
    summary["refit"] = {k: refit[k] for k in ("epochs_run", "steps_run", "n_bags")}
    return model, encoder


def _inner_parts(
    cfg: DictConfig, cohort: Cohort, task: Task, dev: list[str], seed: int, what: str,
) -> list[tuple[list[str], list[str]]] | None:
    """``cv.inner_folds`` stratified (train, val) parts of the ``dev`` patients (:func:`mil.splits.inner_folds`).

    k is lowered to the patient count of the smallest class (stratum) of ``dev``, which each
    validation part needs one of, with a warning; None when that leaves fewer than 2.
    """
    k = int(cfg.cv.inner_folds)
    dev_bags = cohort.subset(set(dev))
    patients = np.array([b.patient_id for b in dev_bags])
    strata, names = task.strata(dev_bags)
    usable = inner_fold_count(patients, strata, k)
    if usable < k:
        logger.warning("%s: the smallest class of its %d training patients has %d patient(s): %s", what, len(dev),
                       usable, f"{usable} inner folds instead of cv.inner_folds={k}" if usable >= 2 else
                       "no inner folds (one validation split, cv.val_fraction)")
    if usable < 2:
        return None
    return inner_folds(patients, strata, names, usable, seed, f"the training patients of {what}")


def _inner_ensemble(
    cfg: DictConfig, cohort: Cohort, task: Task, parts: list[tuple[list[str], list[str]]], out_dir: Path, seed: int,
    what: str,
) -> FoldModel:
    """The k models of the inner ``parts`` (:func:`_inner_parts`), each selected on its own part, to be averaged.

    A cross-validation ensemble (as nnU-Net keeps its five fold models, Isensee et al. 2021, Nat.
    Methods 18:203): the ``dev`` patients (a fold's training + validation patients) are split into
    k stratified parts; model j trains on the other k - 1 parts and keeps its epoch on part j
    (``train.selection``, as a single model does on its validation split), with its own initial
    weights. Every training patient trains k - 1 models and validates one, and averaging the k
    models lowers the variance a small cohort gives one model. The threshold is chosen on the k
    parts' pooled predictions (each patient predicted by the model it validated); averaged
    predictions are a little less spread than one model's, which the threshold does not see.
    """
    k = len(parts)
    models, encoders, summaries, outputs, val_bags = [], [], [], [], []
    for j, (train_j, val_j) in enumerate(parts):
        member_seed = int(np.random.SeedSequence([seed, j]).generate_state(1)[0])  # diverse initial weights
        model, summary, encoder = _fit_model(cfg, cohort, task, train_j, val_j, out_dir / f"inner_{j}", member_seed,
                                             f"{what} (inner model {j + 1}/{k})")
        bags_j = cohort.subset(set(val_j))
        x_val = None if encoder is None else encode_split(encoder, cohort.covariates, bags_j, f"{what}, inner {j}")[0]
        outputs.append(predict_outputs(model, bags_j, cfg.train.eval_batch_size, resolve_device(cfg.trainer.accelerator),
                                       cfg.train.precision, covariates=x_val))
        models.append(model)
        encoders.append(encoder)
        summaries.append(summary)
        val_bags += bags_j
    threshold = task.choose_threshold(val_bags, np.concatenate(outputs)) if task.has_threshold else None
    monitor = summaries[0]["monitor"]
    logger.info("%s: %d inner models kept at epochs %s (%s %s)%s", what, k, [s["best_epoch"] for s in summaries],
                monitor, ", ".join(f"{s.get(f'best_{monitor}', math.nan):.4f}" for s in summaries),
                "" if threshold is None else f"; threshold {threshold:.4f} on their pooled validation parts")
    summary = {
        "best_epoch": [s["best_epoch"] for s in summaries], "epochs_run": [s["epochs_run"] for s in summaries],
        "monitor": monitor, f"best_{monitor}": float(np.mean([s.get(f"best_{monitor}", math.nan) for s in summaries])),
        "selection": f"{k} inner models averaged, each selected on its own part",
        "warnings": [f"inner model {j + 1}: {w}" for j, s in enumerate(summaries) for w in s.get("warnings", [])],
        "threshold": threshold,
        "inner_folds": {"k": k, "n_val": [len(v) for _, v in parts], "ensemble": True, "models": summaries},
    }
    return FoldModel(models, encoders, summary)


def _choose_on_inner_folds(
    cfg: DictConfig, cohort: Cohort, task: Task, dev: list[str], parts: list[tuple[list[str], list[str]]],
    out_dir: Path, seed: int, what: str,
) -> dict[str, Any] | None:
    """Choose the number of epochs and the call threshold on the inner ``parts`` of ``dev`` (:func:`_inner_parts`).

    k-fold early stopping (e.g. Prechelt 1998; the inner loop of nested cross-validation): the
    ``dev`` patients (a fold's training + validation patients) are split into k stratified parts;
    k models each train on k - 1 parts and are validated every epoch on the remaining one. The
    epoch with the best trailing mean (``train.monitor_window``) of the monitor, averaged over the
    k parts, is chosen, and the threshold is chosen on the k parts' pooled predictions at that
    epoch: every training patient informs the choice, where one validation split of a small
    cohort is too small to rank epochs. Returns the fold's summary (as :func:`mil.training.fit`'s,
    plus ``threshold`` and ``inner_folds``), or None when even all ``dev`` patients are too few
    to rank epochs (``train.selection``), in which case the caller trains as without inner folds.
    """
    t, k = cfg.train, len(parts)
    if resolve_selection(t.selection, task.encode(cohort.subset(set(dev))), task, t.min_val_bags) != "best":
        logger.info("%s: %d training patients are too few to rank epochs (train.min_val_bags=%d): cv.inner_folds "
                    "not used; keeping the last epoch of the budget", what, len(dev), t.min_val_bags)
        return None
    inner_cfg = cfg.copy()
    inner_cfg.train.selection, inner_cfg.train.patience = "best", None  # a full validation curve from every part
    records: list[ValidationRecord] = []
    val_bags: list[Bag] = []
    for j, (train_j, val_j) in enumerate(parts):
        record = ValidationRecord()
        _fit_model(inner_cfg, cohort, task, train_j, val_j, out_dir / f"inner_{j}", seed, f"{what} (inner {j + 1}/{k})",
                   callbacks=[record])
        records.append(record)
        val_bags += cohort.subset(set(val_j))
    monitor = task.default_monitor if t.monitor == "auto" else t.monitor
    n_epochs = min(len(r.epochs) for r in records)  # inner parts differ by a patient or so: the common epochs
    curve = [{"epoch": e, **{key: float(np.mean([r.epochs[e].get(key, math.nan) for r in records]))
                             for key in (monitor, "val_loss")}} for e in range(n_epochs)]
    start = first_eligible_epoch(t, n_epochs, math.ceil(min(len(p[0]) for p in parts) / t.batch_size))
    chosen = best_smoothed_epoch(curve, monitor, task.monitor_modes[monitor], min(t.monitor_window, n_epochs), start)
    if chosen is None:
        epoch, smoothed = n_epochs - 1, math.nan
        notes = [f"no finite {monitor} averaged over {k} inner folds: kept the last epoch"]
    else:
        (epoch, smoothed), notes = chosen, []
    at_kept = curve[epoch]
    notes += training_warnings(epoch, n_epochs, at_kept, {}, curve)
    for w in notes:
        logger.warning("%s: %s", what, w)
    outputs = np.concatenate([r.outputs[epoch] for r in records])  # in the order of val_bags
    threshold = task.choose_threshold(val_bags, outputs) if task.has_threshold else None
    logger.info("%s: epoch %d chosen on %d inner folds (mean %s %.4f, smoothed %.4f)%s", what, epoch, k, monitor,
                at_kept[monitor], smoothed, "" if threshold is None else f"; threshold {threshold:.4f}")
    return {
        "best_epoch": epoch, "monitor": monitor, f"best_{monitor}": at_kept[monitor], f"smoothed_{monitor}": smoothed,
        "selection": f"best, averaged over {k} inner folds", "epochs_run": n_epochs,
        "warnings": notes, "threshold": threshold,
        "inner_folds": {"k": k, "n_val": [len(v) for _, v in parts], "curve": curve},
    }


def _fit_model(
    cfg: DictConfig, cohort: Cohort, task: Task, train: list[str], val: list[str], out_dir: Path, seed: int, what: str,
    fixed_epochs: int | None = None, callbacks: Sequence[Callback] = (),
) -> tuple[torch.nn.Module, dict[str, Any], CovariateEncoder | None]:
    """Fit one model (see :func:`mil.training.fit`; ``fixed_epochs``: no validation, final weights kept)."""
    train_bags, val_bags = cohort.subset(set(train)), cohort.subset(set(val))
    for name, bags in (("training", train_bags), ("validation", val_bags)):
        task.check_split(bags, f"the {name} split of {what}", training=name == "training")
    covs = (fit_fold(cohort.covariates, train_bags, val_bags, cfg.cohort.covariates.unseen_category, what)
            if configured(cfg.cohort) else None)  # training patients only, like the feature statistics
    L.seed_everything(seed, workers=True, verbose=False)  # the initial weights too, not only training
    model = build_model(cfg, cohort.dim, task.n_outputs, covs.encoder.dim if covs else 0)
    if isinstance(model, Standardized):
        model.fit(train_bags)  # training patients only: val and test stay unseen
    train_targets = task.encode(train_bags)
    x_train, x_val = (torch.from_numpy(covs.train), torch.from_numpy(covs.val)) if covs else (None, None)
    if covs:  # late fusion starts from the covariates-only linear model of these training patients
        warm_start_late_fusion(model, task, x_train, train_targets, cfg.train.weight_decay)
    model, summary = fit(
        cfg, task.wrap(model, train_targets), task, train_bags, train_targets, val_bags, task.encode(val_bags),
        out_dir, seed, train_covariates=x_train, val_covariates=x_val, fixed_epochs=fixed_epochs, name=what,
        callbacks=callbacks,
    )
    if task.calibrates:  # e.g. survival: centre the risk on the training bags' median
        task.calibrate(model, predict_outputs(model, train_bags, cfg.train.eval_batch_size,
                                              resolve_device(cfg.trainer.accelerator), cfg.train.precision,
                                              covariates=x_train))
    if covs:
        summary["covariates_imputed"] = covs.imputed
    return model, summary, covs.encoder if covs else None


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
    """Train the folds ``indices`` that are not finished; ``wait=False``: skip folds another process holds.

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
    return local_jobs(cfg.cv.jobs, len(left), min((_planned_work(cfg, cohort, f) for f in left), default=0), on_cpu)


def _train_in_processes(
    cfg: DictConfig, cohort: Cohort, task: Task, all_folds: list[Fold], out: Path, indices: Sequence[int], jobs: int,
) -> None:
    """Train folds in ``jobs`` processes at once: this one and ``jobs - 1`` worker processes.

    Each process takes the next fold nobody holds (the fold locks of :mod:`mil.jobs`), with
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
    logger.info("training %d folds in %d processes (cv.jobs=%s), %d torch thread(s) each", len(indices), jobs,
                cfg.cv.jobs, threads)
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
    """Body of a worker process of ``cv.jobs``: train the listed folds of ``run_dir`` that no process holds.

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
    the epoch). ``summary.json``, written last, lists the weight files (see :func:`model_files`)."""
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
    encoder = CovariateEncoder.load(encoder_path(weights)) if configured(cfg.cohort) else None
    model = load_weights(task.wrap(build_model(cfg, int(meta.in_dim), task.n_outputs, encoder.dim if encoder else 0)), weights)
    model.covariate_encoder = encoder
    return model
