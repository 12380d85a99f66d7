"""Patient-level, label-stratified cross-validation splits with an inner validation split.

Folds come from scikit-learn's ``StratifiedGroupKFold`` with patients as groups, so no
patient is ever on two sides of a split, also when bags are slides. Inside each training
fold a second ``StratifiedGroupKFold`` carves out the validation patients that drive early
stopping; the test fold is only used for the final evaluation.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from sklearn.model_selection import StratifiedGroupKFold

from mil.io import write_text
from mil.tables import describe_path

logger = logging.getLogger(__name__)


class SplitError(ValueError):
    """Splits cannot be made or read; the message gives the counts or the file."""


@dataclass
class Fold:
    name: str
    repeat: int
    fold: int
    train: list[str]
    val: list[str]
    test: list[str]


def _patient_labels(patients: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One stratification label per patient (the most common one for slide-level labels)."""
    uniq = np.unique(patients)
    per_patient = np.array([Counter(labels[patients == p]).most_common(1)[0][0] for p in uniq])
    return uniq, per_patient


def check_class_counts(patients: np.ndarray, labels: np.ndarray, n_splits: int, classes: list[str], what: str) -> None:
    _, per_patient = _patient_labels(patients, labels)
    counts = Counter(per_patient.tolist())
    too_few = {classes[c]: counts.get(c, 0) for c in range(len(classes)) if counts.get(c, 0) < n_splits}
    if too_few:
        all_counts = ", ".join(f"{classes[c]}: {counts.get(c, 0)}" for c in range(len(classes)))
        raise SplitError(
            f"{what} needs at least {n_splits} patients of every class, but has {all_counts} "
            f"(too few: {', '.join(too_few)}); lower the number of folds or merge classes"
        )


def inner_split(
    patients: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split patients into (train, val) stratified by label, roughly ``val_fraction`` in val."""
    n_splits = max(2, round(1 / val_fraction))
    uniq, per_patient = _patient_labels(patients, labels)
    counts = Counter(per_patient.tolist())
    n_splits = max(2, min(n_splits, min(counts.values())))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(sgkf.split(uniq, per_patient, groups=uniq))
    return sorted(uniq[train_idx].tolist()), sorted(uniq[val_idx].tolist())


def inner_fold_count(patients: np.ndarray, labels: np.ndarray, k: int) -> int:
    """The number of stratified inner folds ``patients`` allow, at most ``k``: the patient count of their
    smallest class (``patients`` and ``labels`` per bag, as for :func:`inner_folds`)."""
    _, per_patient = _patient_labels(patients, labels)
    return min(k, min(Counter(per_patient.tolist()).values(), default=0))


def inner_folds(
    patients: np.ndarray, labels: np.ndarray, names: list[str], k: int, seed: int, what: str,
) -> list[tuple[list[str], list[str]]]:
    """``k`` stratified (train, val) splits of ``patients`` whose val parts cover every patient once.

    ``patients`` and ``labels`` (stratum indices into ``names``) are per bag, as for
    :func:`make_splits`; each patient is in exactly one val part. ``what`` names the patients in
    errors (e.g. "the training patients of fold_0"). Raises :class:`SplitError` when a stratum has
    fewer than ``k`` patients.
    """
    uniq, per_patient = _patient_labels(patients, labels)
    check_class_counts(uniq, per_patient, k, names, f"cv.inner_folds={k} on {what}")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(sorted(uniq[a].tolist()), sorted(uniq[b].tolist())) for a, b in sgkf.split(uniq, per_patient, groups=uniq)]


def make_splits(
    patients: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    folds: int,
    repeats: int = 1,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> list[Fold]:
    """k-fold x repeats patient-level splits; ``patients`` and ``labels`` are per bag."""
    if folds < 2:
        raise SplitError(f"cv.folds must be at least 2, got {folds}")
    check_class_counts(patients, labels, folds, classes, "cross-validation")
    uniq, per_patient = _patient_labels(patients, labels)
    result = []
    for r in range(repeats):
        sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (dev_idx, test_idx) in enumerate(sgkf.split(uniq, per_patient, groups=uniq)):
            dev = uniq[dev_idx]
            train, val = inner_split(dev, per_patient[dev_idx], val_fraction, seed=seed + 1000 * (r + 1) + k)
            name = f"fold_{k}" if repeats == 1 else f"repeat_{r}_fold_{k}"
            result.append(Fold(name, r, k, train, val, sorted(uniq[test_idx].tolist())))
    return result


def save_splits(folds: list[Fold], path: str | Path) -> None:
    write_text(path, OmegaConf.to_yaml(OmegaConf.create([asdict(f) for f in folds])))


def read_split_yaml(path: Path) -> object:
    """The YAML of a split file with every scalar a string, exactly as written.

    Patient ids are text: a split file written without quotes (a hand edit, an R or Excel
    export) must not turn ``000`` into 0 or ``010`` into 8 (YAML 1.1 octal), so scalars are
    not resolved to numbers or booleans (PyYAML's ``BaseLoader``).
    """
    try:
        return yaml.load(path.read_text(encoding="utf-8-sig"), Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise SplitError(f"{path}: not valid YAML ({e})") from None


def _int_field(item: dict, key: str, default: int, path: Path, i: int) -> int:
    try:
        return int(item.get(key, default))
    except (TypeError, ValueError):
        raise SplitError(f"{path}: fold {i} has {key}={item.get(key)!r}; expected a whole number") from None


def load_splits(path: str | Path, known_patients: set[str]) -> list[Fold]:
    """Read a ``splits.yaml``; patients it names that the cohort lacks are dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"cv.split_file {describe_path(path)} does not exist")
    raw = read_split_yaml(path)
    if not isinstance(raw, list) or not raw:
        raise SplitError(f"{path}: expected a list of folds with train/val/test patient lists")
    folds = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise SplitError(f"{path}: fold {i} is not a mapping with train/val/test patient lists")
        missing = {"train", "val", "test"} - set(item)
        if missing:
            raise SplitError(f"{path}: fold {i} has no {', '.join(sorted(missing))} list")
        bad = [k for k in ("train", "val", "test") if not isinstance(item[k], list)]
        if bad:
            raise SplitError(f"{path}: fold {i}: {', '.join(bad)} must be a list of patient ids")
        parts = {k: [str(p) for p in item[k]] for k in ("train", "val", "test")}
        overlap = (set(parts["train"]) & set(parts["val"])) | (set(parts["test"]) & (set(parts["train"]) | set(parts["val"])))
        if overlap:
            raise SplitError(f"{path}: fold {i} has patients in two of train/val/test: {sorted(overlap)[:5]}")
        for key in parts:
            unknown = [p for p in parts[key] if p not in known_patients]
            if unknown:
                logger.warning("%s fold %d: %d %s patient(s) not in the cohort, dropped (e.g. %s)", path, i, len(unknown), key, unknown[0])
                parts[key] = [p for p in parts[key] if p in known_patients]
        name = str(item.get("name", f"fold_{i}"))
        folds.append(Fold(name, _int_field(item, "repeat", 0, path, i), _int_field(item, "fold", i, path, i), **parts))
    return folds
