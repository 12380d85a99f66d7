"""The task contract: what a model predicts from a bag, how it learns it and how it is scored.

A :class:`Task` knows its label columns (read and checked by :func:`mil.cohort.load_cohort`),
how to encode a bag's labels as a training target, the number of aggregator outputs, the
loss, the torchmetrics Lightning monitors on the validation split, the stratification label
of the splits, the prediction columns and the offline report. The aggregator stays a plain
module with ``n_outputs`` outputs: a task slices them (one head per target) and may wrap the
module in :class:`OutputAffine` so that saved weights predict in the target's units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mil.cohort import Bag, LabelColumn
from mil.config import ConfigError, load_config
from mil.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")

# Config keys that select label columns; a task must use every one of them that is set.
COLUMN_KEYS = ("cohort.target", "cohort.classes", "task.targets", "task.stratify", "task.time", "task.event")

Inputs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


class Task:
    """Base class; subclasses register with ``@TASKS.register("name")``."""

    name: ClassVar[str]
    losses: ClassVar[tuple[str, ...]]  # accepted task.loss values, default first
    uses: ClassVar[tuple[str, ...]] = ()  # which COLUMN_KEYS the task reads
    supports_aux_loss: ClassVar[bool] = False  # a model's auxiliary loss (CLAM, DSMIL) applies
    epoch_loss: ClassVar[bool] = False  # val_loss over the whole validation split (from the metrics' "loss")
    calibrates: ClassVar[bool] = False  # calibrate() gets the trained model's outputs on its training bags

    def __init__(self, columns: list[LabelColumn], cfg: DictConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else load_config([])
        self.columns = list(columns)
        self.thresholds: dict | None = None  # the run's decision thresholds (run.yaml), stated in reports
        self.loss_name = self.cfg.task.loss or self.losses[0]
        if self.loss_name not in self.losses:
            raise ConfigError(f"task.loss={self.loss_name!r} does not apply to task.type={self.name}; use one of {list(self.losses)}")
        for c in self.columns:
            if c.kind == "category" and len(c.classes or []) < 2:
                raise ConfigError(f"{c.key} {c.name!r} has a single class {c.classes}: nothing to learn")

    # ------------------------------------------------------------------ configuration
    @classmethod
    def label_columns(cls, cfg: DictConfig) -> list[LabelColumn]:
        """The label columns named by the config (classes may still be None)."""
        raise NotImplementedError

    @classmethod
    def required_keys(cls, cfg: DictConfig) -> list[str]:
        return []

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse column keys this task ignores (e.g. task.time without task.type=survival)."""
        for key in COLUMN_KEYS:
            value = OmegaConf.select(cfg, key)
            if key not in cls.uses and value not in (None, "") and not (key == "task.targets" and len(value) == 0):
                raise ConfigError(
                    f"{key} is set but task.type={cls.name} does not use it (it reads {', '.join(cls.uses)}); "
                    f"set task.type, or unset {key} ({key}=null)"
                )

    def metadata(self) -> dict[str, Any]:
        """The run.yaml entries that rebuild this task for prediction and reports."""
        first = self.columns[0]
        return {
            "task": self.name,
            "target": first.name,
            "classes": list(first.classes or []),
            "columns": [dataclasses.asdict(c) for c in self.columns],
        }

    # ------------------------------------------------------------------ training
    @property
    def n_outputs(self) -> int:
        raise NotImplementedError

    @property
    def monitor_modes(self) -> dict[str, str]:
        """Loggable validation values for ``train.monitor`` and whether to minimise or maximise them."""
        raise NotImplementedError

    @property
    def default_monitor(self) -> str:
        """What ``train.monitor: auto`` selects the epoch on."""
        return "val_loss"

    def encode(self, bags: list[Bag]) -> torch.Tensor:
        """Training targets of ``bags`` (one row per bag)."""
        raise NotImplementedError

    def strata(self, bags: list[Bag]) -> tuple[np.ndarray, list[str]]:
        """A stratum index per bag and the strata names, for the splits."""
        raise NotImplementedError

    def check_split(self, bags: list[Bag], what: str, training: bool) -> None:
        """Raise when ``bags`` cannot train (or validate) this task, with counts."""

    def make_loss(self, train_targets: torch.Tensor) -> nn.Module:
        """``loss(logits [B, n_outputs], targets) -> scalar``, fitted to the training targets."""
        raise NotImplementedError

    def make_metrics(self) -> ValMetrics:
        raise NotImplementedError

    def wrap(self, model: nn.Module, train_targets: torch.Tensor | None = None) -> nn.Module:
        """The module that is trained and saved; ``train_targets=None`` builds it for loading weights."""
        return model

    def calibrate(self, model: nn.Module, train_outputs: np.ndarray) -> None:
        """Adjust the trained ``model`` in place from its outputs on its training bags."""

    # ------------------------------------------------------------------ predictions and reports
    def truth(self, bags: list[Bag]) -> dict[str, list]:
        """The true value columns of a predictions table (None where unknown)."""
        return {c.name: [parse_value(b.labels.get(c.name), c.kind) for b in bags] for c in self.columns}

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Prediction columns from the raw outputs [n_bags, n_outputs]."""
        raise NotImplementedError

    @property
    def has_threshold(self) -> bool:
        """Whether calls need a threshold chosen on validation predictions (binary classification)."""
        return False

    def choose_threshold(self, bags: list[Bag], outputs: np.ndarray) -> float | None:
        """The decision threshold chosen on ``bags`` (validation) and the model's ``outputs`` on them;
        None for tasks that call without one."""
        return None

    def calls(self, columns: dict[str, np.ndarray], threshold: float | None) -> dict[str, np.ndarray]:
        """Call columns (e.g. ``pred_<target>``) from the prediction ``columns``; none by default."""
        return {}

    @property
    def prediction_names(self) -> list[str]:
        return list(self.predictions(np.zeros((1, self.n_outputs), dtype=np.float32)))

    @property
    def truth_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def csv_dtypes(self) -> dict[str, type]:
        """Columns to read back as strings (class labels)."""
        return {c.name: str for c in self.columns if c.kind == "category"}

    def labelled(self, predictions: pd.DataFrame) -> int:
        """How many rows of a predictions table carry the labels to score them."""
        ok = np.ones(len(predictions), dtype=bool)
        for c in self.columns:
            if not c.optional:
                ok &= predictions[c.name].notna().to_numpy() if c.name in predictions else False
        optional = [predictions[c.name].notna().to_numpy() for c in self.columns if c.optional and c.name in predictions]
        if any(c.optional for c in self.columns):
            ok &= np.logical_or.reduce(optional) if optional else False
        return int(ok.sum())

    def report(self, predictions: pd.DataFrame, out_dir: Path, id_columns: list[str], n_boot: int, seed: int) -> dict:
        """Write metrics.json, summary.md and plots; return the metrics."""
        raise NotImplementedError

    def headline(self, result: dict) -> str:
        """One log line with the main pooled metric."""
        raise NotImplementedError


def parse_value(value: str | None, kind: str) -> Any:
    """A cohort table string as the column's type (checked by the cohort already)."""
    if value is None:
        return None
    if kind == "category":
        return value
    number = float(value)
    return int(number) if kind == "event" else number


def pooled_line(result: dict, metric: str, label: str) -> str:
    p = result["pooled"][metric]
    return f"pooled {label} {p['value']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"


class ValMetrics(nn.Module):
    """Named torchmetrics, each fed by its own view of ``(logits, targets)``.

    Batches are kept until :meth:`compute`, which feeds every metric once: a torchmetrics
    update costs far more than the tiny validation batches of MIL (often one bag each).
    The metrics are ``torchmetrics`` objects so that they synchronise across DDP processes.
    ``summarize`` may add derived values (e.g. means over targets) to the computed dict.
    """

    def __init__(self, metrics: dict[str, tuple[nn.Module, Inputs]], summarize: Callable | None = None) -> None:
        super().__init__()
        self.names = list(metrics)
        self.metrics = nn.ModuleList([m for m, _ in metrics.values()])
        self.inputs = [f for _, f in metrics.values()]
        self.summarize = summarize
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.pending.append((logits.detach(), targets.detach()))

    def compute(self) -> dict[str, torch.Tensor]:
        if self.pending:
            logits, targets = (torch.cat(parts) for parts in zip(*self.pending, strict=True))
            self.pending = []
            for metric, inputs in zip(self.metrics, self.inputs, strict=True):
                metric.update(*inputs(logits, targets))
        values = {name: metric.compute() for name, metric in zip(self.names, self.metrics, strict=True)}
        return self.summarize(values) if self.summarize else values

    def reset(self) -> None:
        self.pending = []
        for metric in self.metrics:
            metric.reset()


class OutputAffine(nn.Module):
    """``logits * scale + shift``: a model predicting in the target's units, or a centred risk.

    The buffers are saved with the weights, so prediction needs nothing else.
    """

    def __init__(self, model: nn.Module, n_outputs: int, shift: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.full((n_outputs,), float(shift)))
        self.register_buffer("scale", torch.full((n_outputs,), float(scale)))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        out = self.model(features, mask, **kwargs)  # kwargs: e.g. covariates
        return dataclasses.replace(out, logits=out.logits * self.scale + self.shift)
