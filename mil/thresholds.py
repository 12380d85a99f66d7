"""Decision thresholds: from a binary classifier's probabilities to a call per bag.

The threshold is chosen on the inner validation split of each training fold (never on the
test fold) by one of these rules (``task.threshold``):

* ``youden`` (default): maximise Youden's J = sensitivity + specificity - 1 over the ROC
  curve's thresholds (Youden, *Cancer* 1950; Fluss et al., *Biom J* 2005);
* ``sensitivity``: the highest threshold whose sensitivity is at least ``task.threshold_target``
  (e.g. 0.95 for a rule-out screen), i.e. the best specificity at that sensitivity;
* ``specificity``: the lowest threshold whose specificity is at least ``task.threshold_target``;
* ``fixed``: ``task.threshold_target`` itself (0.5 when unset, the argmax of two classes).

A bag is called positive when ``P(positive) >= threshold``. Multi-class tasks call the argmax.
A cross-validation fold ensemble (``mil predict``) calls its mean probability against the
mean of the fold thresholds: each fold's threshold belongs to that fold's model, and the
ensemble's probability is the mean of those models' probabilities.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mil.config import ConfigError

logger = logging.getLogger(__name__)

RULES = ("youden", "sensitivity", "specificity", "fixed")
ENSEMBLE_RULE = "mean of the fold thresholds"


@dataclass(frozen=True)
class ThresholdRule:
    """How the threshold is chosen: ``name`` in :data:`RULES` and its ``target`` (where it has one)."""

    name: str = "youden"
    target: float | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ThresholdRule:
        name = str(cfg.task.get("threshold", "youden") or "youden")
        target = cfg.task.get("threshold_target")
        if name not in RULES:
            raise ConfigError(f"task.threshold must be one of {list(RULES)}, got {name!r}")
        if name in ("sensitivity", "specificity") and target is None:
            raise ConfigError(f"task.threshold={name} needs task.threshold_target (e.g. task.threshold_target=0.9)")
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise ConfigError(f"task.threshold_target must lie in [0, 1], got {target}")
        return cls(name, None if target is None else float(target))

    def describe(self) -> str:
        """Words for reports, e.g. ``"Youden's J on the validation split"``."""
        return {
            "youden": "maximum Youden's J on the inner validation split",
            "sensitivity": f"sensitivity >= {self.target} on the inner validation split",
            "specificity": f"specificity >= {self.target} on the inner validation split",
            "fixed": f"fixed at {0.5 if self.target is None else self.target}",
        }[self.name]

    def choose(self, y: np.ndarray, p: np.ndarray) -> float:
        """The threshold on ``p`` (P(positive), [n]) for labels ``y`` ([n], 1 = positive).

        Falls back to 0.5 (with a warning) when the labels hold a single class.
        """
        if self.name == "fixed":
            return 0.5 if self.target is None else self.target
        y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=np.float64)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos == 0 or n_neg == 0:
            logger.warning("threshold: the validation split holds a single class; using 0.5")
            return 0.5
        cuts = np.unique(p)[::-1]  # candidate thresholds, high to low
        called = p[None, :] >= cuts[:, None]  # [n_cuts, n]
        sens = (called & y).sum(axis=1) / n_pos
        spec = (~called & ~y).sum(axis=1) / n_neg
        if self.name == "youden":
            j = sens + spec - 1.0
            return _midway(cuts, np.flatnonzero(np.isclose(j, j.max())).min())  # ties: the highest (most specific) cut
        if self.name == "sensitivity":
            ok = np.flatnonzero(sens >= self.target - 1e-12)
            return _midway(cuts, ok.min())  # highest such cut; the lowest cut has sensitivity 1
        ok = np.flatnonzero(spec >= self.target - 1e-12)
        return _midway(cuts, ok.max()) if len(ok) else float(np.nextafter(cuts[0], math.inf))


def _midway(cuts: np.ndarray, i: int) -> float:
    """The threshold halfway between validation score ``cuts[i]`` and the next lower one ``cuts[i + 1]``.

    Every threshold in ``(cuts[i + 1], cuts[i]]`` makes the same validation calls; the middle of
    that gap keeps the largest margin on both sides (as a decision stump does), so a test bag
    scored a hair below the lowest called validation score is not flipped. With saturated
    probabilities (every validation positive at 1.0) the edge ``cuts[i]`` itself would call
    positive only bags scored exactly 1.0.
    """
    return float((cuts[i] + cuts[i + 1]) / 2) if i + 1 < len(cuts) else float(cuts[i])


def call_classes(probs: np.ndarray, classes: list[str], threshold: float | None) -> np.ndarray:
    """The called class per row of ``probs`` ([n, C]): binary with a threshold, else the argmax."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(classes) == 2 and threshold is not None:
        index = (probs[:, 1] >= threshold).astype(int)
    else:
        index = probs.argmax(axis=1)
    return np.asarray(classes, dtype=object)[index]


def ensemble_threshold(fold_thresholds: dict[str, float]) -> float | None:
    """The threshold of a fold ensemble (:data:`ENSEMBLE_RULE`); None without fold thresholds."""
    values = [float(v) for v in fold_thresholds.values() if v is not None]
    return float(np.mean(values)) if values else None


def threshold_record(rule: ThresholdRule, per_model: dict[str, float], classes: list[str]) -> dict[str, Any]:
    """The ``thresholds`` entry of ``run.yaml``: the rule, each model's value and the ensemble's."""
    record: dict[str, Any] = {"rule": rule.name, "target": rule.target, "describe": rule.describe(),
                              "positive_class": classes[-1], "models": dict(per_model)}
    if len(per_model) > 1:
        record["ensemble"] = ensemble_threshold(per_model)
        record["ensemble_rule"] = ENSEMBLE_RULE
    else:
        record["ensemble"] = next(iter(per_model.values()), None)
    return record


def validation_threshold(task: Any, model: Any, val_bags: list, cfg: DictConfig, covariates: Any = None) -> float | None:
    """``task``'s threshold chosen on the trained ``model``'s predictions of the validation bags.

    ``covariates`` [n_val, C]: the validation bags' encoded clinical covariates, for a model that
    fuses them. Called after training and before the test fold is read, so the test fold plays no part.
    """
    from mil.inference import predict_outputs, resolve_device

    if not task.has_threshold:
        return None
    outputs = predict_outputs(model, val_bags, cfg.train.eval_batch_size, resolve_device(cfg.trainer.accelerator),
                              cfg.train.precision, covariates=covariates)
    threshold = task.choose_threshold(val_bags, outputs)
    logger.info("threshold %.4f (%s, %d validation bags)", threshold, ThresholdRule.from_config(cfg).describe(),
                len(val_bags))
    return threshold


def record_in_run(run_dir: Path, cfg: DictConfig, task: Any, per_model: dict[str, float | None]) -> dict | None:
    """Add the ``thresholds`` record to ``run_dir/run.yaml`` and set it on ``task`` (for its report)."""
    from omegaconf import OmegaConf

    from mil.io import write_text

    if not per_model or all(v is None for v in per_model.values()):
        return None
    record = threshold_record(ThresholdRule.from_config(cfg), per_model, list(task.columns[0].classes or []))
    meta = OmegaConf.load(run_dir / "run.yaml")
    meta.thresholds = record
    write_text(run_dir / "run.yaml", OmegaConf.to_yaml(meta))
    task.thresholds = record
    return record
