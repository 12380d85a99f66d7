"""The inner models of ``cv.inner_folds``: k models per fold, on k stratified parts of its training patients.

Two uses (chosen in :mod:`mil.crossval`): averaged as the fold's model (:func:`inner_ensemble`, the
default), or choosing the number of epochs of one refit (:func:`choose_on_inner_folds`, with
``train.refit``).

Each averaged inner model is a unit of work of its own, saved in ``<fold>/inner_<j>/`` with
``member.json`` written last (the patients, their files, the config and the seed it was trained
with, and its summary),
under the lock ``<fold>/.locks/inner_<j>.lock``. So a ``cv.jobs`` process with no fold left
trains inner models of the folds other processes are training (:func:`help_running_fold`; with
5 folds on 2 processes one core no longer idles through the last fold), and a rerun of an
interrupted fold loads the inner models it finished on the same data.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mil.cohort import Bag, Cohort
from mil.config import config_changes, flat_config
from mil.covariates import CovariateEncoder, encode_split
from mil.fitting import MODEL_FILE, FoldModel, fit_model, load_model, save_model, saved_encoder
from mil.inference import predict_outputs, resolve_device
from mil.io import write_json
from mil.jobs import DONE_FILE, MEMBER_FILE, RESULT_FREE_KEYS, exclusive, is_running
from mil.provenance import record_changes, split_record
from mil.splits import Fold, inner_fold_count, inner_folds
from mil.tasks import Task
from mil.training import (
    ValidationRecord,
    best_smoothed_epoch,
    first_eligible_epoch,
    resolve_selection,
    training_warnings,
)

logger = logging.getLogger(__name__)


def inner_parts(
    cfg: DictConfig, cohort: Cohort, task: Task, dev: list[str], seed: int, what: str, quiet: bool = False,
) -> list[tuple[list[str], list[str]]] | None:
    """``cv.inner_folds`` stratified (train, val) parts of the ``dev`` patients (:func:`mil.splits.inner_folds`).

    k is lowered to the patient count of the smallest class (stratum) of ``dev``, which each
    validation part needs one of, with a warning (unless ``quiet``); None when that leaves fewer than 2.
    """
    k = int(cfg.cv.inner_folds)
    dev_bags = cohort.subset(set(dev))
    patients = np.array([b.patient_id for b in dev_bags])
    strata, names = task.strata(dev_bags)
    usable = inner_fold_count(patients, strata, k)
    if usable < k and not quiet:
        logger.warning("%s: the smallest class of its %d training patients has %d patient(s): %s", what, len(dev),
                       usable, f"{usable} inner folds instead of cv.inner_folds={k}" if usable >= 2 else
                       "no inner folds (one validation split, cv.val_fraction)")
    if usable < 2:
        return None
    return inner_folds(patients, strata, names, usable, seed, f"the training patients of {what}")


def inner_ensemble(
    cfg: DictConfig, cohort: Cohort, task: Task, parts: list[tuple[list[str], list[str]]], out_dir: Path, seed: int,
    what: str,
) -> FoldModel:
    """The k models of the inner ``parts`` (:func:`inner_parts`), each selected on its own part, to be averaged.

    A cross-validation ensemble (as nnU-Net keeps its five fold models, Isensee et al. 2021, Nat.
    Methods 18:203): the ``dev`` patients (a fold's training + validation patients) are split into
    k stratified parts; model j trains on the other k - 1 parts and keeps its epoch on part j
    (``train.selection``, as a single model does on its validation split), with its own initial
    weights. Every training patient trains k - 1 models and validates one, and averaging the k
    models lowers the variance a small cohort gives one model. The threshold is chosen on the k
    parts' pooled predictions (each patient predicted by the model it validated); averaged
    predictions are a little less spread than one model's, which the threshold does not see.
    Each model is a unit of work of its own (:func:`_member`): one finished by another process, or
    by an interrupted run before this one, as it would be trained now (the same patients and their
    files, config and seed), is loaded, not trained.
    """
    k = len(parts)
    found = {j: _member(cfg, cohort, task, parts, j, out_dir, seed, what, wait=False) for j in range(k)}
    for j in [j for j, member in found.items() if member is None]:  # another process trains it: wait, then load
        found[j] = _member(cfg, cohort, task, parts, j, out_dir, seed, what, wait=True)
    models, encoders, summaries, outputs, val_bags = [], [], [], [], []
    for j, (_, val_j) in enumerate(parts):
        model, summary, encoder = found[j]
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
    return FoldModel(models, encoders, summary, saved_in=out_dir)


def choose_on_inner_folds(
    cfg: DictConfig, cohort: Cohort, task: Task, dev: list[str], parts: list[tuple[list[str], list[str]]],
    out_dir: Path, seed: int, what: str,
) -> dict[str, Any] | None:
    """Choose the number of epochs and the call threshold on the inner ``parts`` of ``dev`` (:func:`inner_parts`).

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
        fit_model(inner_cfg, cohort, task, train_j, val_j, out_dir / f"inner_{j}", seed, f"{what} (inner {j + 1}/{k})",
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


def member_seed(seed: int, j: int) -> int:
    """The seed of inner model ``j`` of a fold seeded ``seed``: its own initial weights, reproducibly."""
    return int(np.random.SeedSequence([seed, j]).generate_state(1)[0])


def _shared(cfg: DictConfig) -> bool:
    """Whether inner models are files that other processes may train and load: with one device per model.
    (Under DDP every rank trains each model together, so no rank may take one alone.)"""
    devices = str(cfg.trainer.devices)
    return devices == "1" or (devices == "auto" and resolve_device(cfg.trainer.accelerator).type == "cpu")


def _member_record(cfg: DictConfig, cohort: Cohort, part: tuple[list[str], list[str]], seed: int) -> dict[str, Any]:
    """What inner model training on ``part`` depends on: the patients (their files and labels), the config
    (but for the keys that never change results) and the seed."""
    config = {k: v for k, v in flat_config(cfg).items() if k not in RESULT_FREE_KEYS}
    return {**split_record(cohort, {"train": part[0], "val": part[1]}), "config": config, "seed": seed}


def _saved_member(folder: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the inner model saved in ``folder`` when it was trained as ``record`` says; else None,
    logging what differs (it is then trained again)."""
    path = folder / MEMBER_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s is unreadable (%s): training its inner model again", path, e)
        return None
    before = saved.get("record") or {}
    changes = record_changes(before or None, record)
    config = config_changes(before.get("config") or {}, record["config"])
    if config:
        changes.append("config " + ", ".join(config[:5]))
    if before.get("seed") != record["seed"]:
        changes.append("another seed")
    if changes:
        logger.info("%s was trained otherwise than now (%s): training it again", folder, "; ".join(changes))
        return None
    return saved["summary"]


def _member(
    cfg: DictConfig, cohort: Cohort, task: Task, parts: list[tuple[list[str], list[str]]], j: int, out_dir: Path,
    seed: int, what: str, wait: bool = True, helping: Callable[[], bool] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], CovariateEncoder | None] | None:
    """Inner model ``j`` of ``parts`` (model, summary, covariate encoder), trained into ``out_dir/inner_<j>``.

    Loaded instead when it is finished there as it would be trained now (patients, files, config
    and seed; by another process, or by an interrupted run before). Returns None when another
    process holds it and not ``wait``. ``helping``: this process trains it for the process that
    holds the fold, only if nobody has started it (no ``member.json``) and ``helping()`` is still
    true once the lock is held; then it returns None. Under DDP (several devices) it is always
    trained here.
    """
    folder, s = out_dir / f"inner_{j}", member_seed(seed, j)
    name = f"{what} (inner model {j + 1}/{len(parts)})"
    if not _shared(cfg):
        return fit_model(cfg, cohort, task, *parts[j], folder, s, name)
    record = _member_record(cfg, cohort, parts[j], s)
    with exclusive(out_dir, folder.name, wait=wait and helping is None) as mine:
        if not mine:
            return None
        if helping is not None:
            if (folder / MEMBER_FILE).exists() or not helping():  # the fold's own process decides about it
                return None
        else:
            summary = _saved_member(folder, record)
            if summary is not None:
                logger.info("%s: finished by another process or an earlier run, as it would be now; loaded", name)
                encoder = saved_encoder(cfg, folder / MODEL_FILE)
                return load_model(cfg, task, cohort.dim, folder / MODEL_FILE, encoder), summary, encoder
        model, summary, encoder = fit_model(cfg, cohort, task, *parts[j], folder, s, name)
        save_model(folder / MODEL_FILE, model, encoder)
        write_json(folder / MEMBER_FILE, {"record": record, "summary": summary})  # last: marks it finished
        return None if helping is not None else (model, summary, encoder)


def help_running_fold(cfg: DictConfig, cohort: Cohort, task: Task, fold: Fold, fold_dir: Path, seed: int) -> None:
    """Train the inner models of ``fold`` that nobody has started while another process trains the fold.

    For ``cv.jobs`` processes that have no fold left to take: they go from the last inner model
    down while the fold's own process goes up, and each model is saved for that process to load
    (:func:`inner_ensemble`). Does nothing unless the fold is running elsewhere and unfinished,
    and ``cv.inner_folds`` models are averaged on one device each. An error stops the helping
    with a warning: the fold's own process trains that model again and reports its error.
    """
    out = fold_dir.parent
    if not cfg.cv.inner_folds or cfg.train.refit or not _shared(cfg) or not is_running(out, fold.name):
        return

    def still_running() -> bool:
        return not (fold_dir / DONE_FILE).is_file() and is_running(out, fold.name)

    try:
        parts = inner_parts(cfg, cohort, task, sorted([*fold.train, *fold.val]), seed, fold.name, quiet=True)
        for j in reversed(range(len(parts or []))):
            if not still_running():
                return
            _member(cfg, cohort, task, parts, j, fold_dir, seed, f"{fold.name}, for the process that holds it",
                    wait=False, helping=still_running)
    except Exception as e:  # the fold's own process retrains the model and raises the error
        logger.warning("%s: training an inner model for the process that holds the fold failed (%s: %s); "
                       "that process trains it itself", fold.name, type(e).__name__, e)
