"""One model of a run: building, fitting and saving it, and the model files a fold predicts with.

The layers above: :mod:`mil.ensemble` (the inner models of ``cv.inner_folds``) and
:mod:`mil.crossval` (folds and runs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from mil.cohort import Bag, Cohort
from mil.covariates import CovariateEncoder, configured, encode_split, encoder_path, fit_fold
from mil.fusion import CovariateFusion, warm_start_late_fusion
from mil.inference import load_weights, predict_outputs, resolve_device, save_weights
from mil.models import create_model
from mil.normalize import Standardized
from mil.tasks import Task
from mil.training import fit

logger = logging.getLogger(__name__)


def build_model(cfg: DictConfig, in_dim: int, n_outputs: int, n_covariates: int = 0) -> torch.nn.Module:
    """The configured aggregator, fused with ``n_covariates`` encoded covariates (``model.fusion``)
    when there are any, and wrapped in :class:`Standardized` when ``train.standardize``."""
    model = create_model(cfg.model.name, in_dim, n_outputs, **OmegaConf.to_container(cfg.model.args))
    if n_covariates:
        model = CovariateFusion(model, n_covariates, cfg.model.fusion)
    return Standardized(model, in_dim) if cfg.train.standardize else model


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
    saved_in: Path | None = None  # the folder whose inner_<j>/ already hold the models (mil.ensemble writes each as it ends)

    def save(self, folder: Path) -> list[str]:
        """Write each model's weights (and covariate encoder) into ``folder``; returns their paths relative to it
        (``model.safetensors``, or ``inner_<j>/model.safetensors`` for several), for ``summary.json`` → ``models``."""
        names = [MODEL_FILE] if len(self.models) == 1 else [f"inner_{j}/{MODEL_FILE}" for j in range(len(self.models))]
        if len(self.models) > 1 and self.saved_in is not None and Path(self.saved_in).resolve() == Path(folder).resolve():
            return names  # already there, each beside its member.json: writing them again would change nothing
        for name, model, encoder in zip(names, self.models, self.encoders, strict=True):
            save_model(folder / name, model, encoder)
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


def fit_model(
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


def save_model(path: Path, model: torch.nn.Module, encoder: CovariateEncoder | None = None) -> None:
    """Write ``model``'s weights to ``path`` (safetensors) and its covariate encoder beside them (when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if encoder is not None:
        encoder.save(encoder_path(path))
    save_weights(model, path)


def saved_encoder(cfg: DictConfig, weights: str | Path) -> CovariateEncoder | None:
    """The covariate encoder saved beside ``weights`` (:func:`save_model`) when ``cfg`` uses covariates; else None."""
    return CovariateEncoder.load(encoder_path(weights)) if configured(cfg.cohort) else None


def load_model(cfg: DictConfig, task: Task, in_dim: int, weights: str | Path, encoder: CovariateEncoder | None = None
               ) -> torch.nn.Module:
    """The network of ``cfg`` for ``task`` (wrapped as :meth:`Task.wrap` saves it) with the weights of ``weights``.

    ``encoder``: the covariate encoder the model was trained with (its width sizes the fusion).
    Raises ``FileNotFoundError`` when ``weights`` does not exist.
    """
    return load_weights(task.wrap(build_model(cfg, in_dim, task.n_outputs, encoder.dim if encoder else 0)), weights)
