"""Cohorts: clinical and slide tables joined to bag files, one :class:`Bag` per patient or slide.

Rows that cannot be used (a patient without slides, a slide without a bag, a missing label)
are skipped, counted and listed in :attr:`Cohort.skipped`; rows that are wrong (a label
outside ``cohort.classes``, duplicate slide ids, bags of different encoders) are errors that
name the file and row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mil.bags import BagInfo, read_bag_info

logger = logging.getLogger(__name__)


class CohortError(ValueError):
    """A cohort table problem; the message names the file, row or column."""


@dataclass
class Bag:
    """One training / prediction unit: a patient's slides, or a single slide."""

    bag_id: str
    patient_id: str
    slide_ids: list[str]
    paths: list[Path]
    label: str | None
    n_tiles: int


@dataclass
class Cohort:
    bags: list[Bag]
    classes: list[str]
    dim: int
    identity: dict[str, str]
    bag_level: str
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["kind", "id", "reason"]))

    @property
    def patient_ids(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags])

    @property
    def labels(self) -> np.ndarray:
        """Class index of each bag (-1 where unlabelled)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index.get(b.label, -1) if b.label is not None else -1 for b in self.bags])

    def subset(self, patients: set[str]) -> list[Bag]:
        return [b for b in self.bags if b.patient_id in patients]


def read_table(path: str | Path, required: list[str], what: str) -> pd.DataFrame:
    """Read a CSV as strings, checking that the required columns exist."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{what} {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CohortError(f"{what} {path} cannot be parsed as CSV: {e}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CohortError(f"{what} {path} has no column {', '.join(map(repr, missing))}; columns are {list(df.columns)}")
    for column in required:
        df[column] = df[column].str.strip()
    return df


def _check_unique(df: pd.DataFrame, column: str, path: str | Path) -> None:
    dup = df[df[column].duplicated(keep=False) & df[column].notna()]
    if len(dup):
        rows = ", ".join(str(i + 2) for i in dup.index[:6])  # +2: header line, 1-based rows
        raise CohortError(f"{path}: duplicate {column} {dup[column].iloc[0]!r} (rows {rows})")


def load_cohort(cfg: DictConfig, require_labels: bool = True) -> Cohort:
    """Build the cohort described by the ``cohort`` section of a config.

    ``require_labels=False`` keeps unlabelled bags (prediction on a new cohort).
    """
    pcol, scol, target = cfg.patient_column, cfg.slide_column, cfg.target
    if cfg.bag_level not in ("patient", "slide"):
        raise CohortError(f"cohort.bag_level must be 'patient' or 'slide', got {cfg.bag_level!r}")
    slides = read_table(cfg.slide_csv, [pcol, scol], "slide table")
    _check_unique(slides, scol, cfg.slide_csv)
    skipped: list[tuple[str, str, str]] = []

    label_source = None
    if cfg.clinical_csv:
        clinical = read_table(cfg.clinical_csv, [pcol], "clinical table")
        _check_unique(clinical, pcol, cfg.clinical_csv)
        if target and target in clinical.columns:
            label_source = cfg.clinical_csv
            slides = slides.drop(columns=[target], errors="ignore").merge(
                clinical[[pcol, target]], on=pcol, how="left"
            )
        for pid in sorted(set(clinical[pcol].dropna()) - set(slides[pcol].dropna())):
            skipped.append(("patient", pid, "no slides in the slide table"))
        unknown = slides[~slides[pcol].isin(clinical[pcol])]
        for sid in unknown[scol]:
            skipped.append(("slide", sid, "patient not in the clinical table"))
        slides = slides[slides[pcol].isin(clinical[pcol])]
    if target and label_source is None:
        if target in slides.columns:
            label_source = cfg.slide_csv
        elif require_labels:
            where = f"{cfg.clinical_csv} or {cfg.slide_csv}" if cfg.clinical_csv else str(cfg.slide_csv)
            raise CohortError(f"label column cohort.target={target!r} not found in {where}")
        else:
            logger.info("no %r column: predicting without labels", target)
            target = None
    if require_labels and not target:
        raise CohortError("cohort.target is not set: name the label column")

    classes = [str(c) for c in cfg.classes] if cfg.classes else None
    if target and classes is not None:
        present = slides[target].dropna()
        bad = present[~present.isin(classes)]
        if len(bad):
            row = bad.index[0]
            raise CohortError(
                f"{label_source}: label {bad.iloc[0]!r} for {slides.loc[row, pcol]!r} is not in "
                f"cohort.classes {classes}"
            )

    features_dir = Path(cfg.features_dir)
    if not features_dir.is_dir():
        raise CohortError(f"cohort.features_dir {features_dir} is not a folder")
    infos: dict[str, BagInfo] = {}
    keep = []
    for i, row in slides.iterrows():
        sid, pid = row[scol], row[pcol]
        if pd.isna(sid) or pd.isna(pid):
            raise CohortError(f"{cfg.slide_csv}: row {i + 2} has an empty {scol} or {pcol}")
        path = features_dir / f"{sid}.h5"
        if not path.is_file():
            skipped.append(("slide", sid, f"no bag {path.name} in {features_dir}"))
            continue
        if target and pd.isna(row[target]) and require_labels:
            skipped.append(("slide", sid, f"missing {target} label"))
            continue
        infos[sid] = read_bag_info(path)
        keep.append(i)
    slides = slides.loc[keep]
    if not infos:
        raise CohortError(f"no usable bags: none of the {len(keep) + len(skipped)} listed slides has a bag in {features_dir}")
    _check_consistent(list(infos.values()))

    if target and classes is None:
        classes = sorted(slides[target].dropna().unique().tolist())
    bags = _group(slides, infos, pcol, scol, target, cfg.bag_level, label_source)
    first = next(iter(infos.values()))
    skipped_df = pd.DataFrame(skipped, columns=["kind", "id", "reason"])
    if len(skipped_df):
        logger.warning(
            "skipped %d row(s) (%s); see skipped.csv", len(skipped_df),
            ", ".join(f"{n} {r}" for r, n in skipped_df.reason.str.split(" in ").str[0].value_counts().items()),
        )
    logger.info("cohort: %d bags, %d patients, classes %s", len(bags), len({b.patient_id for b in bags}), classes)
    return Cohort(bags, classes or [], first.dim, first.identity, cfg.bag_level, skipped_df)


def _check_consistent(infos: list[BagInfo]) -> None:
    first = infos[0]
    for info in infos[1:]:
        if info.dim != first.dim:
            raise CohortError(
                f"bags have different feature dimensions: {first.path} has {first.dim}, {info.path} has {info.dim}"
            )
        if info.identity != first.identity:
            diff = {k: (first.identity[k], info.identity[k]) for k in first.identity if first.identity[k] != info.identity[k]}
            raise CohortError(
                f"bags come from different encoders: {first.path} and {info.path} differ in "
                + ", ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in diff.items())
            )


def _group(
    slides: pd.DataFrame,
    infos: dict[str, BagInfo],
    pcol: str,
    scol: str,
    target: str | None,
    bag_level: str,
    label_source: str | None,
) -> list[Bag]:
    bags = []
    if bag_level == "slide":
        for _, row in slides.iterrows():
            info = infos[row[scol]]
            label = row[target] if target and not pd.isna(row[target]) else None
            bags.append(Bag(row[scol], row[pcol], [row[scol]], [info.path], label, info.n_tiles))
        return bags
    for pid, group in slides.groupby(pcol, sort=True):
        labels = group[target].dropna().unique() if target else []
        if len(labels) > 1:
            raise CohortError(
                f"{label_source}: patient {pid!r} has slides with different {target} labels {sorted(labels)}; "
                "use cohort.bag_level=slide for slide-level labels"
            )
        sids = group[scol].tolist()
        paths = [infos[s].path for s in sids]
        label = labels[0] if len(labels) else None
        bags.append(Bag(str(pid), str(pid), sids, paths, label, sum(infos[s].n_tiles for s in sids)))
    return bags
