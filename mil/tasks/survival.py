"""Survival (``task.time``, ``task.event``): a Cox model of the bag's log relative hazard.

Loss: the negative Cox partial log-likelihood (Breslow ties) over each training batch.
Batch-size caveat: risk sets only contain the bags of the same batch, so the loss is a
stochastic approximation of the full-cohort likelihood whose quality grows with
``train.batch_size`` (a batch of one bag gives no gradient); use 16-64 bags with
``train.bag_size`` keeping the batches small in memory. Validation loss is computed on the
whole validation split at once (exact risk sets), which is what early stopping monitors.

After training, the risk output is centred on the median risk of the model's own training
bags (saved with the weights), so ``risk > 0`` is the "high-risk" group of a median split
from the training folds, for Kaplan–Meier curves and the log-rank test. Risks of different
folds share that reference, which makes pooled out-of-fold c-indices meaningful. Splits are
stratified on the event indicator.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mil.cohort import Bag, LabelColumn
from mil.io import write_json, write_text
from mil.metrics import concordance_index, logrank_p, survival_metrics
from mil.plots import plot_km
from mil.report import evaluate, format_summary
from mil.splits import SplitError
from mil.tasks.base import TASKS, OutputAffine, Task, ValMetrics, pooled_line

logger = logging.getLogger(__name__)


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood per event (Breslow's handling of tied times)."""
    order = torch.argsort(time, descending=True)
    r, t, e = risk[order], time[order], event[order].float()
    log_cumulative = torch.logcumsumexp(r, dim=0)
    # A bag's risk set is every bag with time >= its own, tied times included: take the
    # cumulative sum at the last of its tied times in the descending order.
    _, inverse, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    log_risk_set = log_cumulative[(torch.cumsum(counts, 0) - 1)[inverse]]
    n_events = e.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((r - log_risk_set) * e).sum() / n_events


class CoxLoss(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cox_loss(logits[:, 0], target[:, 0], target[:, 1])


class _Collected(Metric):
    """Keeps every (risk, time, event) of the epoch, gathered across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("risk", "time", "event"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> None:
        self.risk.append(risk.detach().float())
        self.time.append(time.float())
        self.event.append(event.float())

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.risk), dim_zero_cat(self.time), dim_zero_cat(self.event)


class EpochCoxLoss(_Collected):
    """The Cox loss of the whole validation split (every bag in every risk set)."""

    def compute(self) -> torch.Tensor:
        return cox_loss(*self.arrays())


class ConcordanceIndex(_Collected):
    """Harrell's c-index (see :func:`mil.metrics.concordance_index`)."""

    def compute(self) -> torch.Tensor:
        risk, time, event = (a.cpu().numpy() for a in self.arrays())
        return torch.tensor(concordance_index(risk, time, event), dtype=torch.float32)


@TASKS.register("survival")
class SurvivalTask(Task):
    """Time-to-event target; prediction column ``risk`` (log relative hazard, > 0 = high risk)."""

    name = "survival"
    losses = ("cox",)
    uses = ("task.time", "task.event")
    epoch_loss = True
    calibrates = True

    @classmethod
    def label_columns(cls, cfg: DictConfig) -> list[LabelColumn]:
        return [LabelColumn(cfg.task.time, "time", key="task.time"), LabelColumn(cfg.task.event, "event", key="task.event")]

    @classmethod
    def required_keys(cls, cfg: DictConfig) -> list[str]:
        return ["task.time", "task.event"]

    @property
    def time(self) -> str:
        return self.columns[0].name

    @property
    def event(self) -> str:
        return self.columns[1].name

    @property
    def n_outputs(self) -> int:
        return 1

    @property
    def default_monitor(self) -> str:
        return "val_c_index"

    @property
    def monitor_modes(self) -> dict[str, str]:
        return {"val_loss": "min", "val_c_index": "max"}

    def encode(self, bags: list[Bag]) -> torch.Tensor:
        values = [[float(b.labels[self.time]), float(b.labels[self.event])] for b in bags]
        return torch.tensor(values, dtype=torch.float32).reshape(-1, 2)

    def strata(self, bags: list[Bag]) -> tuple[np.ndarray, list[str]]:
        events = self.encode(bags)[:, 1].long().numpy()
        names = [n for i, n in enumerate(("censored", "event")) if (events == i).any()]
        return (events if len(names) == 2 else np.zeros_like(events)), names

    def check_split(self, bags: list[Bag], what: str, training: bool) -> None:
        events = int(self.encode(bags)[:, 1].sum())
        if events == 0:
            message = f"{what} has no events ({len(bags)} censored bags)"
            if training:
                raise SplitError(f"{message}: the Cox loss needs events; lower the number of folds")
            logger.warning("%s: its validation loss and c-index are undefined", message)

    def wrap(self, model: nn.Module, train_targets: torch.Tensor | None = None) -> nn.Module:
        return OutputAffine(model, 1)

    def calibrate(self, model: nn.Module, train_outputs: np.ndarray) -> None:
        model.shift -= float(np.median(train_outputs[:, 0]))

    def make_loss(self, train_targets: torch.Tensor) -> nn.Module:
        if self.cfg.train.batch_size < 8:
            logger.warning("train.batch_size=%d: Cox risk sets of so few bags give noisy gradients (see mil.tasks.survival)",
                           self.cfg.train.batch_size)
        return CoxLoss()

    def make_metrics(self) -> ValMetrics:
        def inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return logits[:, 0], targets[:, 0], targets[:, 1]

        return ValMetrics({"loss": (EpochCoxLoss(), inputs), "c_index": (ConcordanceIndex(), inputs)})

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"risk": np.asarray(outputs, dtype=np.float64)[:, 0]}

    def report(self, predictions: pd.DataFrame, out_dir: Path, id_columns: list[str], n_boot: int, seed: int) -> dict:
        """``metrics.json``, ``summary.md`` and ``km.png`` (high vs low risk, log-rank p)."""
        rows = predictions[predictions[self.time].notna() & predictions[self.event].notna()]

        def arrays(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
            return df["risk"].to_numpy(float), df[self.time].to_numpy(float), df[self.event].to_numpy(float)

        found, pooled = evaluate(rows, id_columns, [self.time, self.event], ["risk"], survival_metrics, arrays, n_boot, seed)
        risk, time, event = arrays(pooled)
        p = logrank_p(time, event, risk > 0)
        found["pooled"]["logrank_p"] = {"value": p}
        result = {"task": self.name, "time": self.time, "event": self.event, "n_bootstrap": n_boot, **found}
        write_json(out_dir / "metrics.json", result)
        write_text(out_dir / "summary.md", format_summary(result, title=f"survival ({self.time}, {self.event})"))
        plot_km(time, event, risk > 0, p, out_dir / "km.png", title="Predicted risk groups", xlabel=self.time)
        return result

    def headline(self, result: dict) -> str:
        return f"{pooled_line(result, 'c_index', 'c-index')}, log-rank p {result['pooled']['logrank_p']['value']:.3g}"
