"""Regression of a continuous column (``cohort.target``), e.g. tumour mutational burden.

The aggregator has one output, wrapped in :class:`OutputAffine` with the training targets'
mean and standard deviation, so its raw output is a z-score and the saved model predicts in
the target's units. The loss (``task.loss``: ``mse`` or ``huber``) is computed on the
standardised residual, so ``task.huber_delta`` is in standard deviations. Splits are
stratified on quantile bins of the target (up to quartiles, at least 10 patients a bin).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchmetrics.regression import MeanAbsoluteError, PearsonCorrCoef, R2Score, SpearmanCorrCoef

from mil.cohort import Bag, LabelColumn
from mil.io import write_json, write_text
from mil.metrics import regression_metrics
from mil.plots import plot_scatter
from mil.report import evaluate, format_summary
from mil.splits import SplitError
from mil.tasks.base import TASKS, OutputAffine, Task, ValMetrics, pooled_line

logger = logging.getLogger(__name__)


def location_scale(targets: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the training targets (std floored to stay invertible)."""
    t = targets.double()
    std = float(t.std()) if len(t) > 1 else 1.0
    return float(t.mean()), std if std > 1e-8 else 1.0


class StandardizedLoss(nn.Module):
    """MSE or Huber loss of ``(prediction - target) / std``."""

    def __init__(self, kind: str, std: float, delta: float = 1.0) -> None:
        super().__init__()
        self.kind, self.delta = kind, delta
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, y = logits[:, 0] / self.std, target.float() / self.std
        if self.kind == "huber":
            return F.huber_loss(pred, y, delta=self.delta)
        return F.mse_loss(pred, y)


@TASKS.register("regression")
class RegressionTask(Task):
    """One numeric target per bag; prediction column ``pred_<target>``."""

    name = "regression"
    losses = ("mse", "huber")
    uses = ("cohort.target",)

    @classmethod
    def label_columns(cls, cfg: DictConfig) -> list[LabelColumn]:
        return [LabelColumn(cfg.cohort.target, "number")]

    @classmethod
    def required_keys(cls, cfg: DictConfig) -> list[str]:
        return ["cohort.target"]

    @property
    def target(self) -> str:
        return self.columns[0].name

    @property
    def n_outputs(self) -> int:
        return 1

    @property
    def monitor_modes(self) -> dict[str, str]:
        return {"val_loss": "min", "val_pearson": "max", "val_spearman": "max", "val_mae": "min", "val_r2": "max"}

    def values(self, bags: list[Bag]) -> np.ndarray:
        return np.array([float(v) if (v := b.labels.get(self.target)) is not None else np.nan for b in bags])

    def encode(self, bags: list[Bag]) -> torch.Tensor:
        return torch.from_numpy(self.values(bags).astype(np.float32))

    def strata(self, bags: list[Bag]) -> tuple[np.ndarray, list[str]]:
        values = self.values(bags)
        n_bins = int(np.clip(len({b.patient_id for b in bags}) // 10, 1, 4))
        codes = pd.qcut(pd.Series(values).rank(method="first"), n_bins, labels=False).to_numpy()
        return codes.astype(np.int64), [f"{self.target} Q{i + 1}/{n_bins}" for i in range(n_bins)]

    def check_split(self, bags: list[Bag], what: str, training: bool) -> None:
        values = self.values(bags)
        if len(np.unique(values)) < 2:
            message = f"{what} has {len(values)} bag(s) with {len(np.unique(values))} distinct {self.target} value(s)"
            if training:
                raise SplitError(f"{message}: nothing to learn; lower the number of folds")
            logger.warning("%s: its validation correlations are undefined", message)

    def wrap(self, model: nn.Module, train_targets: torch.Tensor | None = None) -> nn.Module:
        mean, std = location_scale(train_targets) if train_targets is not None else (0.0, 1.0)
        return OutputAffine(model, 1, shift=mean, scale=std)

    def make_loss(self, train_targets: torch.Tensor) -> nn.Module:
        return StandardizedLoss(self.loss_name, location_scale(train_targets)[1], self.cfg.task.huber_delta)

    def make_metrics(self) -> ValMetrics:
        def inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return logits[:, 0], targets.float()

        with warnings.catch_warnings():  # "Spearman keeps all predictions": a validation split is small
            warnings.simplefilter("ignore", UserWarning)
            spearman = SpearmanCorrCoef()
        return ValMetrics({
            "pearson": (PearsonCorrCoef(), inputs),
            "spearman": (spearman, inputs),
            "mae": (MeanAbsoluteError(), inputs),
            "r2": (R2Score(), inputs),
        })

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {f"pred_{self.target}": np.asarray(outputs, dtype=np.float64)[:, 0]}

    def report(self, predictions: pd.DataFrame, out_dir: Path, id_columns: list[str], n_boot: int, seed: int) -> dict:
        """``metrics.json``, ``summary.md`` and ``scatter.png`` (predicted against true)."""
        pred = f"pred_{self.target}"
        rows = predictions[predictions[self.target].notna()]
        found, pooled = evaluate(
            rows, id_columns, [self.target], [pred], regression_metrics,
            lambda df: (df[self.target].to_numpy(float), df[pred].to_numpy(float)), n_boot, seed,
        )
        result = {"task": self.name, "target": self.target, "n_bootstrap": n_boot, **found}
        write_json(out_dir / "metrics.json", result)
        write_text(out_dir / "summary.md", format_summary(result, title=f"{self.target} (regression)"))
        repeated = "repeat" in rows and rows["repeat"].nunique() > 1
        plot_scatter(pooled if repeated else rows, self.target, pred, out_dir / "scatter.png")
        return result

    def headline(self, result: dict) -> str:
        return f"{pooled_line(result, 'pearson', 'Pearson r')}, MAE {result['pooled']['mae']['value']:.3g}"
