"""Per-slide scores of a patient-level run: which slide drove a patient's call.

With ``cohort.bag_level: patient`` a model sees all of a patient's slides as one bag. For
review, each slide's own bag is also passed through the same model(s), and the scores go to
``slide_predictions.csv`` (patient id, slide id, the patient's labels, the task's prediction
columns). These are the model applied to one slide at a time, not a decomposition of the
patient score: attention-MIL is not additive over slides.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from torch import nn

from mil.bags import read_bag_info
from mil.cohort import Bag
from mil.inference import predict_outputs, resolve_device
from mil.io import atomic_path

logger = logging.getLogger(__name__)

FILE = "slide_predictions.csv"


def slide_bags(bags: list[Bag]) -> list[Bag]:
    """One bag per slide of ``bags`` (in order), carrying its patient's labels."""
    return [replace(b, bag_id=sid, slide_ids=[sid], paths=[path], n_tiles=read_bag_info(path).n_tiles)
            for b in bags for sid, path in zip(b.slide_ids, b.paths, strict=True)]


def slide_table(cfg: DictConfig, task, bags: list[Bag], models: list[nn.Module],
                covariates: list[np.ndarray | None] | None = None) -> pd.DataFrame:
    """Each slide of ``bags`` through each of ``models`` (prediction columns averaged over them).

    ``covariates``: per model, the bags' encoded clinical covariates [n_bags, C] (None for a
    model without them); each slide gets its patient's row.
    """
    slides = slide_bags(bags)
    device = resolve_device(cfg.trainer.accelerator)
    per_slide = np.repeat(np.arange(len(bags)), [len(b.slide_ids) for b in bags])  # slide -> its bag's row
    covariates = covariates or [None] * len(models)
    per_model = [task.predictions(predict_outputs(m, slides, cfg.train.eval_batch_size, device, cfg.train.precision,
                                                  covariates=None if x is None else np.asarray(x)[per_slide]))
                 for m, x in zip(models, covariates, strict=True)]
    columns = {c: np.mean([p[c] for p in per_model], axis=0) for c in per_model[0]}
    df = pd.DataFrame({cfg.cohort.patient_column: [b.patient_id for b in slides],
                       cfg.cohort.slide_column: [b.slide_ids[0] for b in slides]})
    for name, values in task.truth(slides).items():
        df[name] = values
    return pd.concat([df, pd.DataFrame(columns, index=df.index)], axis=1)


def write_slide_predictions(cfg: DictConfig, task, bags: list[Bag], models: list[nn.Module], path: Path,
                            covariates: list[np.ndarray | None] | None = None, **extra: str) -> pd.DataFrame | None:
    """Write ``path`` (``slide_predictions.csv``) for patient-level runs; ``extra`` columns (e.g. fold) first.

    ``covariates``: as in :func:`slide_table`.
    """
    if cfg.cohort.bag_level != "patient" or not bags:
        return None
    df = slide_table(cfg, task, bags, models, covariates)
    for i, (name, value) in enumerate(extra.items()):
        df.insert(2 + i, name, value)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def pool_fold_slide_predictions(out: Path, fold_names: list[str]) -> Path | None:
    """Concatenate the folds' ``slide_predictions.csv`` into the run's (None when the folds have none)."""
    parts = [out / name / FILE for name in fold_names]
    if not all(p.is_file() for p in parts):
        return None
    df = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""]) for p in parts], ignore_index=True)
    with atomic_path(out / FILE) as tmp:
        df.to_csv(tmp, index=False)
    return out / FILE
