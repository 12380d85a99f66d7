"""Cohorts: clinical and slide tables joined to bag files, one :class:`Bag` per patient or slide.

Rows that cannot be used (a patient without slides, a slide without a bag, a missing label)
are skipped, counted and listed in :attr:`Cohort.skipped`; rows that are wrong (a label
outside ``cohort.classes``, duplicate slide ids, bags of different encoders) are errors that
name the file and row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mil.bags import IDENTITY_ATTRS, UNKNOWN, BagInfo, identity_value, read_bag_info

logger = logging.getLogger(__name__)


class CohortError(ValueError):
    """A cohort table problem; the message names the file, row or column."""


KINDS = ("category", "number", "time", "event")


@dataclass
class LabelColumn:
    """A column a task reads from the cohort tables, and how its values are checked.

    ``category``: one of ``classes`` (None: the sorted values found); ``number``: a finite
    number; ``time``: a number >= 0; ``event``: 0 (censored) or 1 (event). An ``optional``
    column may be missing for a bag as long as another optional column is present
    (multi-target); any other missing value skips the bag. ``key`` and ``classes_key`` are the
    config keys that name the column and its classes, for messages.
    """

    name: str
    kind: str = "category"
    classes: list[str] | None = None
    optional: bool = False
    key: str = "cohort.target"
    classes_key: str = "cohort.classes"


@dataclass
class Bag:
    """One training / prediction unit: a patient's slides, or a single slide."""

    bag_id: str
    patient_id: str
    slide_ids: list[str]
    paths: list[Path]
    label: str | None  # the first label column's value (the target of single-label tasks)
    n_tiles: int
    labels: dict[str, str | None] = field(default_factory=dict)  # every label column's value (None: missing)


@dataclass
class Cohort:
    bags: list[Bag]
    classes: list[str]  # classes of the first label column (empty unless it is categorical)
    dim: int
    identity: dict[str, str]
    bag_level: str
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["kind", "id", "reason"]))
    columns: list[LabelColumn] = field(default_factory=list)  # label columns, classes resolved
    covariates: Any = None  # mil.covariates.RawCovariates when cohort.covariates names columns (set by the runs)

    @property
    def patient_ids(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags])

    @property
    def labels(self) -> np.ndarray:
        """Class index of each bag in the first label column (-1 where unlabelled)."""
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


def check_values(df: pd.DataFrame, column: LabelColumn, source: str | Path, id_column: str) -> None:
    """Raise on the first value of ``column`` in ``df`` that its kind forbids, naming the row."""
    values = df[column.name]
    present = values.notna()
    if column.kind == "category":
        bad = present & ~values.isin(column.classes) if column.classes is not None else present & False
        problem = f"is not in {column.classes_key} {column.classes}"
    else:
        numbers = pd.to_numeric(values.where(present), errors="coerce")
        bad = present & ~np.isfinite(numbers.astype(float))
        problem = "is not a number"
        if column.kind == "time" and not bad.any():
            bad, problem = present & (numbers < 0), "is negative; survival times must be >= 0"
        elif column.kind == "event" and not bad.any():
            bad, problem = present & ~numbers.isin([0, 1]), "must be 0 (censored) or 1 (event)"
    if bad.any():
        row = bad[bad].index[0]
        what = "label" if column.kind == "category" else f"{column.name} value"
        raise CohortError(
            f"{source}: {what} {values[row]!r} for {df.loc[row, id_column]!r} {problem} "
            f"(row {row + 2})"  # +2: header line, 1-based rows
        )


def _missing_reason(row: pd.Series, columns: list[LabelColumn]) -> str | None:
    """Why a slide row cannot be used for training, or None when its labels suffice."""
    required = [c.name for c in columns if not c.optional and pd.isna(row[c.name])]
    if required:
        return f"missing {', '.join(required)} label" + ("s" if len(required) > 1 else "")
    optional = [c.name for c in columns if c.optional]
    if optional and all(pd.isna(row[name]) for name in optional):
        return f"missing all labels ({', '.join(optional)})"
    return None


def load_cohort(
    cfg: DictConfig, require_labels: bool = True, columns: list[LabelColumn] | None = None
) -> Cohort:
    """Build the cohort described by the ``cohort`` section of a config.

    ``columns`` are the label columns to read (default: ``cohort.target`` as a category with
    ``cohort.classes``); each comes from the clinical table when it has the column, else from
    the slide table. ``require_labels=False`` keeps unlabelled bags and drops absent columns
    (prediction on a new cohort).
    """
    pcol, scol = cfg.patient_column, cfg.slide_column
    if cfg.bag_level not in ("patient", "slide"):
        raise CohortError(f"cohort.bag_level must be 'patient' or 'slide', got {cfg.bag_level!r}")
    if columns is None:
        if require_labels and not cfg.target:
            raise CohortError("cohort.target is not set: name the label column")
        columns = [LabelColumn(cfg.target, classes=[str(c) for c in cfg.classes] if cfg.classes else None)] if cfg.target else []
    for c in columns:
        if c.kind not in KINDS:
            raise CohortError(f"label column {c.name!r}: kind must be one of {KINDS}, got {c.kind!r}")
    slides = read_table(cfg.slide_csv, [pcol, scol], "slide table")
    _check_unique(slides, scol, cfg.slide_csv)
    skipped: list[tuple[str, str, str]] = []

    sources: dict[str, str] = {}
    if cfg.clinical_csv:
        clinical = read_table(cfg.clinical_csv, [pcol], "clinical table")
        _check_unique(clinical, pcol, cfg.clinical_csv)
        here = [c for c in columns if c.name in clinical.columns]
        for c in here:
            check_values(clinical, c, cfg.clinical_csv, pcol)
            sources[c.name] = str(cfg.clinical_csv)
        names = [c.name for c in here]
        slides = slides.drop(columns=names, errors="ignore").merge(clinical[[pcol, *names]], on=pcol, how="left")
        for pid in sorted(set(clinical[pcol].dropna()) - set(slides[pcol].dropna())):
            skipped.append(("patient", pid, "no slides in the slide table"))
        unknown = slides[~slides[pcol].isin(clinical[pcol])]
        for sid in unknown[scol]:
            skipped.append(("slide", sid, "patient not in the clinical table"))
        slides = slides[slides[pcol].isin(clinical[pcol])]
    for c in [c for c in columns if c.name not in sources]:
        if c.name in slides.columns:
            check_values(slides, c, cfg.slide_csv, scol)
            sources[c.name] = str(cfg.slide_csv)
        elif require_labels:
            where = f"{cfg.clinical_csv} or {cfg.slide_csv}" if cfg.clinical_csv else str(cfg.slide_csv)
            raise CohortError(f"label column {c.key}={c.name!r} not found in {where}")
        else:
            logger.info("no %r column: predicting without it", c.name)
    columns = [c for c in columns if c.name in sources]

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
        reason = _missing_reason(row, columns) if require_labels else None
        if reason:
            skipped.append(("slide", sid, reason))
            continue
        infos[sid] = read_bag_info(path)
        keep.append(i)
    slides = slides.loc[keep]
    if not infos:
        raise CohortError(f"no usable bags: none of the {len(keep) + len(skipped)} listed slides has a bag in {features_dir}")
    identity = _check_consistent(list(infos.values()), dict(cfg.get("bag_identity") or {}))

    columns = [
        replace(c, classes=sorted(slides[c.name].dropna().unique().tolist()))
        if c.kind == "category" and c.classes is None else c
        for c in columns
    ]
    bags = _group(slides, infos, pcol, scol, columns, cfg.bag_level, sources)
    first = next(iter(infos.values()))
    skipped_df = pd.DataFrame(skipped, columns=["kind", "id", "reason"])
    if len(skipped_df):
        logger.warning(
            "skipped %d row(s) (%s); see skipped.csv", len(skipped_df),
            ", ".join(f"{n} {r}" for r, n in skipped_df.reason.str.split(" in ").str[0].value_counts().items()),
        )
    classes = list(columns[0].classes or []) if columns and columns[0].kind == "category" else []
    logger.info("cohort: %d bags, %d patients, label columns %s", len(bags), len({b.patient_id for b in bags}),
                ", ".join(c.name + (f" {c.classes}" if c.classes else f" ({c.kind})") for c in columns) or "none")
    return Cohort(bags, classes, first.dim, identity, cfg.bag_level, skipped_df, columns)


def bag_identity(info: BagInfo, declared: dict[str, str]) -> dict[str, str]:
    """A bag's identity, with ``cohort.bag_identity`` filling what the bag does not record.

    Raises :class:`CohortError` when the bag records a value other than the declared one.
    """
    identity = dict(info.identity)
    for key, value in declared.items():
        if identity[key] == UNKNOWN:
            identity[key] = value
        elif identity[key] != value:
            raise CohortError(
                f"{info.path} records {key}={identity[key]!r}, but cohort.bag_identity declares {value!r}; "
                "declare only what the bags do not record"
            )
    return identity


def _check_consistent(infos: list[BagInfo], declared: dict | None = None) -> dict[str, str]:
    """The cohort's feature identity; raises naming two bags that differ in dimension or identity."""
    unknown_keys = sorted(set(declared or {}) - set(IDENTITY_ATTRS))
    if unknown_keys:
        raise CohortError(f"cohort.bag_identity: unknown key(s) {unknown_keys}; valid keys are {list(IDENTITY_ATTRS)}")
    declared = {k: identity_value(v) for k, v in (declared or {}).items()}
    first = infos[0]
    first_identity = bag_identity(first, declared)
    for info in infos[1:]:
        if info.dim != first.dim:
            raise CohortError(
                f"bags have different feature dimensions: {first.path} has {first.dim}, {info.path} has {info.dim}"
            )
        identity = bag_identity(info, declared)
        if identity != first_identity:
            diff = {k: (first_identity[k], identity[k]) for k in first_identity if first_identity[k] != identity[k]}
            raise CohortError(
                f"bags were made differently (encoder, resolution or tile size): {first.path} and {info.path} differ in "
                + ", ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in diff.items())
                + "; extract all bags of a cohort the same way"
            )
    unknown = [k for k, v in first_identity.items() if v == UNKNOWN]
    if unknown:
        logger.warning(
            "the bags in %s do not record %s (bags from another tool?): a model cannot check they match; "
            "declare them with cohort.bag_identity={%s}", first.path.parent, ", ".join(unknown),
            ", ".join(f"{k}: ..." for k in unknown),
        )
    return first_identity


def _group(
    slides: pd.DataFrame,
    infos: dict[str, BagInfo],
    pcol: str,
    scol: str,
    columns: list[LabelColumn],
    bag_level: str,
    sources: dict[str, str],
) -> list[Bag]:
    def value(v: object) -> str | None:
        return None if pd.isna(v) else str(v)

    bags = []
    if bag_level == "slide":
        for _, row in slides.iterrows():
            info = infos[row[scol]]
            labels = {c.name: value(row[c.name]) for c in columns}
            bags.append(Bag(row[scol], row[pcol], [row[scol]], [info.path], _first(labels), info.n_tiles, labels))
        return bags
    for pid, group in slides.groupby(pcol, sort=True):
        labels = {}
        for c in columns:
            values = group[c.name].dropna().unique()
            if len(values) > 1:
                raise CohortError(
                    f"{sources[c.name]}: patient {pid!r} has slides with different {c.name} labels {sorted(values)}; "
                    "use cohort.bag_level=slide for slide-level labels"
                )
            labels[c.name] = value(values[0]) if len(values) else None
        sids = group[scol].tolist()
        paths = [infos[s].path for s in sids]
        bags.append(Bag(str(pid), str(pid), sids, paths, _first(labels), sum(infos[s].n_tiles for s in sids), labels))
    return bags


def _first(labels: dict[str, str | None]) -> str | None:
    return next(iter(labels.values()), None)
