"""Single-label classification, binary or multi-class (``cohort.target``, ``cohort.classes``).

The helpers for one categorical head (class weights, masked cross-entropy, validation
metrics, probability columns) are shared with :mod:`mil.tasks.multi_target`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassF1Score,
)

from mil.cohort import Bag, LabelColumn
from mil.report import classification_report
from mil.splits import check_class_counts
from mil.tasks.base import TASKS, Inputs, Task, ValMetrics, pooled_line
from mil.thresholds import ThresholdRule, call_classes

CATEGORICAL_MONITORS = {"auroc": "max", "ap": "max", "balanced_accuracy": "max", "accuracy": "max", "f1": "max"}


def class_weights(labels: torch.Tensor, n_classes: int) -> list[float]:
    """Inverse-frequency weights of the labelled rows (-1 = missing), normalised to mean 1."""
    labels = labels[labels >= 0]
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).tolist()


def encode_labels(bags: list[Bag], column: LabelColumn) -> np.ndarray:
    """Class index of each bag in ``column`` (-1 where missing)."""
    index = {c: i for i, c in enumerate(column.classes or [])}
    return np.array([index[v] if (v := b.labels.get(column.name)) is not None else -1 for b in bags], dtype=np.int64)


def check_labels(bags: list[Bag], column: LabelColumn, what: str) -> None:
    """Every class of ``column`` must occur in ``bags`` (error with the counts)."""
    labels = encode_labels(bags, column)
    known = labels >= 0
    patients = np.array([b.patient_id for b in bags])[known]
    check_class_counts(patients, labels[known], 1, list(column.classes or []), what)


class CrossEntropy(nn.Module):
    """Cross-entropy (optionally class-weighted); rows labelled -1 (missing) are ignored.

    Class weights act per bag: the loss is ``sum_i w[y_i] * ce_i / n`` over the ``n`` labelled
    bags of the batch. With weights normalised to mean 1 over the training bags (as
    :func:`class_weights` does), each class carries an equal share of an epoch's loss at every
    batch size. ``F.cross_entropy(weight=w)`` would divide by the batch's summed weights
    instead, which cancels the weighting at batch size 1 and dilutes it at small batches.
    """

    def __init__(self, weight: list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(weight, dtype=torch.float32) if weight else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = target.long()
        valid = y >= 0
        if not bool(valid.all()):
            if not bool(valid.any()):
                return logits.sum() * 0.0  # nothing labelled in this batch: no gradient, no NaN
            logits, y = logits[valid], y[valid]
        per_bag = F.cross_entropy(logits, y, reduction="none")
        if self.weight is not None:
            per_bag = per_bag * self.weight[y]
        return per_bag.mean()


def categorical_metrics(n_classes: int, inputs: Inputs, suffix: str = "", ignore_index: int | None = None) -> dict:
    """torchmetrics for one categorical head; ``inputs(logits, targets) -> (probs [B, K], labels [B])``."""
    ii = ignore_index

    def positive(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, y = inputs(logits, targets)
        return probs[:, 1], y

    if n_classes == 2:
        metrics = {
            "auroc": (BinaryAUROC(ignore_index=ii), positive),
            "ap": (BinaryAveragePrecision(ignore_index=ii), positive),
            "balanced_accuracy": (MulticlassAccuracy(num_classes=2, average="macro", ignore_index=ii), inputs),
            "accuracy": (BinaryAccuracy(ignore_index=ii), positive),
            "f1": (BinaryF1Score(ignore_index=ii), positive),
        }
    else:
        k = n_classes
        metrics = {
            "auroc": (MulticlassAUROC(num_classes=k, ignore_index=ii), inputs),
            "ap": (MulticlassAveragePrecision(num_classes=k, ignore_index=ii), inputs),
            "balanced_accuracy": (MulticlassAccuracy(num_classes=k, average="macro", ignore_index=ii), inputs),
            "accuracy": (MulticlassAccuracy(num_classes=k, average="micro", ignore_index=ii), inputs),
            "f1": (MulticlassF1Score(num_classes=k, average="macro", ignore_index=ii), inputs),
        }
    return {f"{name}{suffix}": m for name, m in metrics.items()}


def probability_columns(logits: np.ndarray, prefix: str, classes: list[str]) -> dict[str, np.ndarray]:
    probs = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).softmax(-1).numpy()
    return {f"{prefix}{c}": probs[:, i] for i, c in enumerate(classes)}


def curve_label(predictions: pd.DataFrame, thresholds: dict | None) -> str:
    """"pooled" out-of-fold predictions (cross-validation), else an external cohort's "fold ensemble"."""
    if "fold" in predictions:
        return "pooled"
    ensemble = any(c.startswith("fold_") and "." in c for c in predictions.columns) or \
        len((thresholds or {}).get("models") or {}) > 1
    return "fold ensemble" if ensemble else "all bags"


@TASKS.register("classification")
class ClassificationTask(Task):
    """One categorical label per bag; softmax over ``len(classes)`` outputs, cross-entropy loss."""

    name = "classification"
    losses = ("cross_entropy",)
    uses = ("cohort.target", "cohort.classes")
    supports_aux_loss = True

    @classmethod
    def label_columns(cls, cfg: DictConfig) -> list[LabelColumn]:
        c = cfg.cohort
        return [LabelColumn(c.target, "category", [str(x) for x in c.classes] if c.classes else None)]

    @classmethod
    def required_keys(cls, cfg: DictConfig) -> list[str]:
        return ["cohort.target"]

    @property
    def column(self) -> LabelColumn:
        return self.columns[0]

    @property
    def classes(self) -> list[str]:
        return list(self.column.classes or [])

    @property
    def n_outputs(self) -> int:
        return len(self.classes)

    @property
    def default_monitor(self) -> str:
        return "val_auroc"

    @property
    def monitor_modes(self) -> dict[str, str]:
        return {"val_loss": "min", **{f"val_{k}": v for k, v in CATEGORICAL_MONITORS.items()}}

    def encode(self, bags: list[Bag]) -> torch.Tensor:
        return torch.from_numpy(encode_labels(bags, self.column))

    def strata(self, bags: list[Bag]) -> tuple[np.ndarray, list[str]]:
        return encode_labels(bags, self.column), self.classes

    def check_split(self, bags: list[Bag], what: str, training: bool) -> None:
        check_labels(bags, self.column, what)

    def make_loss(self, train_targets: torch.Tensor) -> nn.Module:
        weighted = self.cfg.train.class_weighted
        return CrossEntropy(class_weights(train_targets, self.n_outputs) if weighted else None)

    def make_metrics(self) -> ValMetrics:
        def inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return logits.softmax(-1), targets.long()

        return ValMetrics(categorical_metrics(self.n_outputs, inputs))

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return probability_columns(outputs, "prob_", self.classes)

    @property
    def has_threshold(self) -> bool:
        return self.n_outputs == 2  # multi-class: argmax

    def csv_dtypes(self) -> dict[str, type]:
        return {**super().csv_dtypes(), f"pred_{self.column.name}": str}

    def choose_threshold(self, bags: list[Bag], outputs: np.ndarray) -> float | None:
        if not self.has_threshold:
            return None
        y = encode_labels(bags, self.column)
        p = self.predictions(outputs)[f"prob_{self.classes[-1]}"]
        known = y >= 0
        return ThresholdRule.from_config(self.cfg).choose(y[known] == 1, p[known])

    def calls(self, columns: dict[str, np.ndarray], threshold: float | None) -> dict[str, np.ndarray]:
        probs = np.stack([columns[f"prob_{c}"] for c in self.classes], axis=1)
        return {f"pred_{self.column.name}": call_classes(probs, self.classes, threshold)}

    def report(self, predictions: pd.DataFrame, out_dir: Path, id_columns: list[str], n_boot: int, seed: int) -> dict:
        return classification_report(predictions, self.column.name, self.classes, out_dir, id_columns, n_boot, seed,
                                     thresholds=self.thresholds, curve_label=curve_label(predictions, self.thresholds))

    def headline(self, result: dict) -> str:
        return f"{pooled_line(result, 'auroc', 'AUROC')}, balanced accuracy {result['pooled']['balanced_accuracy']['value']:.3f}"
