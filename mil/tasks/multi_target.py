"""Several categorical targets trained jointly (``task.targets``), e.g. MSI, BRAF and KRAS status.

One aggregator with ``sum(len(classes))`` outputs; target t's head is its slice of the
outputs (the heads share the aggregator). A bag missing some labels still trains the others:
the loss of each target is masked to its labelled bags and averaged over the targets
labelled in the batch. Splits are stratified on ``task.stratify`` (default: the first
target); bags missing that label are stratified with its most common class.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn

from mil.cohort import Bag, LabelColumn
from mil.config import ConfigError
from mil.io import write_json, write_text
from mil.report import classification_report
from mil.tasks.base import TASKS, Task, ValMetrics
from mil.tasks.classification import (
    CATEGORICAL_MONITORS,
    CrossEntropy,
    categorical_metrics,
    check_labels,
    class_weights,
    encode_labels,
    probability_columns,
)

logger = logging.getLogger(__name__)


class MultiTargetLoss(nn.Module):
    """Mean over targets of each target's masked (optionally class-weighted) cross-entropy."""

    def __init__(self, slices: list[slice], weights: list[list[float] | None]) -> None:
        super().__init__()
        self.slices = slices
        self.heads = nn.ModuleList([CrossEntropy(w) for w in weights])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = [head(logits[:, s], target[:, t]) for t, (s, head) in enumerate(zip(self.slices, self.heads, strict=True))]
        labelled = [(target[:, t] >= 0).any() for t in range(len(self.slices))]
        present = [loss for loss, ok in zip(losses, labelled, strict=True) if ok]
        return torch.stack(present).mean() if present else logits.sum() * 0.0


def safe_name(name: str) -> str:
    """A column name usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


@TASKS.register("multi_target")
class MultiTargetTask(Task):
    """One categorical head per target column; metrics and reports per target."""

    name = "multi_target"
    losses = ("cross_entropy",)
    uses = ("task.targets", "task.stratify")

    def __init__(self, columns: list[LabelColumn], cfg: DictConfig | None = None) -> None:
        super().__init__(columns, cfg)
        names = [c.name for c in self.columns]
        self.stratify = self.cfg.task.stratify or names[0]
        if self.stratify not in names:
            raise ConfigError(f"task.stratify={self.stratify!r} is not one of the task.targets columns {names}")
        sizes = [len(c.classes or []) for c in self.columns]
        ends = np.cumsum(sizes).tolist()
        self.slices = [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]

    @classmethod
    def label_columns(cls, cfg: DictConfig) -> list[LabelColumn]:
        targets = cfg.task.targets
        if not targets:
            raise ConfigError("task.type=multi_target needs task.targets, e.g. [{column: MSI, classes: [MSS, MSI-H]}, {column: BRAF}]")
        columns = []
        for i, t in enumerate(targets):
            if not t.column:
                raise ConfigError(f"task.targets[{i}].column is not set")
            classes = [str(c) for c in t.classes] if t.classes else None
            columns.append(LabelColumn(t.column, "category", classes, optional=True,
                                       key=f"task.targets[{i}].column", classes_key=f"task.targets[{i}].classes"))
        names = [c.name for c in columns]
        if len(set(names)) < len(names):
            raise ConfigError(f"task.targets name a column twice: {names}")
        return columns

    @property
    def n_outputs(self) -> int:
        return self.slices[-1].stop

    @property
    def default_monitor(self) -> str:
        return "val_auroc"

    @property
    def monitor_modes(self) -> dict[str, str]:
        modes = {"val_loss": "min", **{f"val_{k}": v for k, v in CATEGORICAL_MONITORS.items()}}
        for c in self.columns:
            modes.update({f"val_{k}_{c.name}": v for k, v in CATEGORICAL_MONITORS.items()})
        return modes

    def encode(self, bags: list[Bag]) -> torch.Tensor:
        return torch.from_numpy(np.stack([encode_labels(bags, c) for c in self.columns], axis=1))

    def strata(self, bags: list[Bag]) -> tuple[np.ndarray, list[str]]:
        column = next(c for c in self.columns if c.name == self.stratify)
        labels = encode_labels(bags, column)
        if (labels < 0).any():
            common = np.bincount(labels[labels >= 0], minlength=len(column.classes or [])).argmax()
            labels = np.where(labels < 0, common, labels)
        return labels, list(column.classes or [])

    def check_split(self, bags: list[Bag], what: str, training: bool) -> None:
        for c in self.columns:
            if training or c.name == self.stratify:
                check_labels(bags, c, f"{what} (target {c.name})")
            else:
                labels = encode_labels(bags, c)
                if len(np.unique(labels[labels >= 0])) < len(c.classes or []):
                    logger.warning("%s lacks a class of %s: its validation AUROC is undefined", what, c.name)

    def make_loss(self, train_targets: torch.Tensor) -> nn.Module:
        weighted = self.cfg.train.class_weighted
        weights = [class_weights(train_targets[:, t], s.stop - s.start) if weighted else None
                   for t, s in enumerate(self.slices)]
        return MultiTargetLoss(self.slices, weights)

    def make_metrics(self) -> ValMetrics:
        metrics = {}
        for t, (c, s) in enumerate(zip(self.columns, self.slices, strict=True)):
            def inputs(logits: torch.Tensor, targets: torch.Tensor, t: int = t, s: slice = s):
                return logits[:, s].softmax(-1), targets[:, t].long()

            metrics.update(categorical_metrics(s.stop - s.start, inputs, suffix=f"_{c.name}", ignore_index=-1))

        def summarize(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            means = {k: torch.stack([values[f"{k}_{c.name}"].float() for c in self.columns]).nanmean()
                     for k in CATEGORICAL_MONITORS}
            return {**means, **values}

        return ValMetrics(metrics, summarize)

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        columns: dict[str, np.ndarray] = {}
        for c, s in zip(self.columns, self.slices, strict=True):
            columns.update(probability_columns(outputs[:, s], f"prob_{c.name}_", list(c.classes or [])))
        return columns

    def report(self, predictions: pd.DataFrame, out_dir: Path, id_columns: list[str], n_boot: int, seed: int) -> dict:
        """Each target's classification report in ``<out_dir>/<target>/``; a combined summary on top."""
        result: dict = {"task": self.name, "targets": {}, "n_bootstrap": n_boot}
        summaries = []
        for c in self.columns:
            prefix = f"prob_{c.name}_"
            rows = predictions[predictions[c.name].notna()]
            if rows.empty:
                logger.warning("no %s labels: no report for this target", c.name)
                continue
            keep = [*id_columns, *[k for k in ("fold", "repeat") if k in rows], c.name]
            renamed = {f"{prefix}{k}": f"prob_{k}" for k in c.classes or []}
            table = rows[keep + list(renamed)].rename(columns=renamed)
            sub = classification_report(table, c.name, list(c.classes or []), out_dir / safe_name(c.name), id_columns, n_boot, seed)
            result["targets"][c.name] = sub
            summaries.append((out_dir / safe_name(c.name) / "summary.md").read_text().replace("# ", "## ", 1))
        write_json(out_dir / "metrics.json", result)
        write_text(out_dir / "summary.md", "# Multi-target\n\n" + "\n".join(summaries))
        return result

    def headline(self, result: dict) -> str:
        parts = [f"{name} {r['pooled']['auroc']['value']:.3f}" for name, r in result["targets"].items()]
        return "pooled AUROC per target: " + ", ".join(parts)
