"""Cohorts: clinical and slide tables joined to bag files, one :class:`Bag` per patient or slide.

Rows that cannot be used (a patient without slides, a slide without a bag, a missing label)
are skipped, counted and listed in :attr:`Cohort.skipped`; rows that are wrong (a label
outside ``cohort.classes``, duplicate slide ids, bags of different encoders) are errors that
name the file and row.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mil import tables
from mil.bags import IDENTITY_ATTRS, UNKNOWN, BagInfo, EmptyBagError, identity_value, read_bag_info

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
    unknown_labels: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> {value outside classes: count}
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


# Names other tools give the id columns (CLAM: case_id; STAMP: PATIENT, FILENAME), accepted when
# the table lacks the configured default name.
ID_ALIASES = {"patient_id": ("case_id", "patient"), "slide_id": ("filename", "slide_name")}


def read_table(path: str | Path, required: list[str], what: str) -> pd.DataFrame:
    """Read a cohort table (CSV with any separator, TSV or .xlsx) as strings; see :mod:`mil.tables`."""
    try:
        return tables.read_table(path, required, what, aliases=ID_ALIASES)
    except tables.TableError as e:
        raise CohortError(str(e)) from None


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


def _prepare_values(
    df: pd.DataFrame, column: LabelColumn, source: str | Path, id_column: str, unknown_labels: str,
    unknown: dict[str, dict[str, int]],
) -> None:
    """Normalise a label column in place (spaces, numeric missing spellings), then check it.

    Category values are strings as written: only empty cells are missing. With
    ``unknown_labels="ignore"`` a category value outside the column's classes becomes missing
    and is counted in ``unknown`` instead of raising, as long as every class still has a bag
    (otherwise the names look renamed, and the error names both sides).
    """
    values = df[column.name]
    values = values.where(values.isna(), values.astype(str).str.strip()).replace("", None)
    if column.kind != "category":
        values = tables.numeric_missing(values)
    elif unknown_labels == "ignore" and column.classes is not None:
        outside = values.notna() & ~values.isin(column.classes)
        # A few extra classes (MSI-L beside MSS and MSI-H) are left out; a trained class that no
        # bag has while other names appear looks like a renamed class: check_values refuses it.
        renamed = set(column.classes) - set(values[~outside].dropna())
        if outside.any() and not renamed:
            unknown[column.name] = {str(k): int(v) for k, v in values[outside].value_counts().items()}
            values = values.where(~outside)
    df[column.name] = values
    check_values(df, column, source, id_column)


def _table_paths(cfg: DictConfig) -> tuple[str, str | None]:
    """(slide table, clinical table or None): one CLAM-style table may serve as both."""
    slide_csv, clinical_csv = cfg.slide_csv, cfg.clinical_csv
    if not slide_csv and not clinical_csv:
        raise CohortError("set cohort.slide_csv: a table with patient and slide id columns (and the labels; "
                          "a separate per-patient cohort.clinical_csv is optional)")
    if not slide_csv:
        logger.info("cohort.clinical_csv %s is the only table: reading patients, slides and labels from it", clinical_csv)
        return clinical_csv, None
    if clinical_csv and Path(clinical_csv).resolve() == Path(slide_csv).resolve():
        logger.info("cohort.clinical_csv and cohort.slide_csv are one table: reading it once")
        return slide_csv, None
    return slide_csv, clinical_csv


def _normal_id(value: str) -> str:
    return value.strip().casefold().lstrip("0") or "0"


def _check_ids_match(clinical: pd.DataFrame, slides: pd.DataFrame, pcol: str, clinical_csv: str, slide_csv: str) -> None:
    """Name ids that differ between the tables (with examples from each side).

    Raises when none match, or when some differ from the other table's only in leading zeros, case or
    spaces: those are the same patients after an export, and skipping them would quietly shrink the
    cohort. Other ids found in the slide table only are a warning; their slides are skipped.
    """
    in_clinical, in_slides = set(clinical[pcol].dropna()), set(slides[pcol].dropna())
    only_slides, only_clinical = sorted(in_slides - in_clinical), sorted(in_clinical - in_slides)
    if not only_slides:
        return
    normal = {_normal_id(p): p for p in only_clinical}
    pairs = [(p, normal[_normal_id(p)]) for p in only_slides if _normal_id(p) in normal]
    hint = ""
    if pairs:
        examples = ", ".join(f"{a!r} vs {b!r}" for a, b in pairs[:3])
        hint = (f"; {len(pairs)} differ only in leading zeros, case or spaces ({slide_csv} vs {clinical_csv}: {examples}): "
                "a spreadsheet or R export turned the ids into numbers; keep the id column as text in both tables")
    message = (f"{len(only_slides)} of the {len(in_slides)} patients in {slide_csv} are not in {clinical_csv} "
               f"(e.g. {only_slides[:3]}; ids only in {clinical_csv}: {only_clinical[:3]}){hint}")
    if not in_slides & in_clinical or pairs:
        raise CohortError(f"patient ids do not match between the tables: {message}")
    logger.warning("%s; their slides are skipped", message)


def _suggest(name: str, columns: list[str]) -> str:
    """`` (did you mean 'msi'?)`` for the column that matches ``name`` but for case, or is closest to it."""
    close = [c for c in columns if c.casefold() == name.casefold()] or difflib.get_close_matches(name, columns, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _same_value(a: str, b: str) -> bool:
    """Two label cells agree: equal as written (spaces stripped), or as numbers (``1`` and ``1.0``)."""
    a, b = str(a).strip(), str(b).strip()
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _check_labels_agree(
    clinical: pd.DataFrame, slides: pd.DataFrame, names: list[str], pcol: str, scol: str, clinical_csv: str,
    slide_csv: str,
) -> None:
    """Refuse a label column that both tables hold with different values for a patient, listing every such row.

    The clinical table's values are the ones used; a slide table that disagrees means one of the two is
    out of date, and training on either silently would hide it.
    """
    conflicts: list[str] = []
    for name in [n for n in names if n in slides.columns]:
        truth = dict(zip(clinical[pcol], clinical[name], strict=True))
        for i, row in slides.iterrows():
            here, there = row[name], truth.get(row[pcol])
            if pd.isna(here) or str(here).strip() == "" or there is None or pd.isna(there) or _same_value(here, there):
                continue
            conflicts.append(f"row {i + 2} ({scol} {row[scol]!r}, {pcol} {row[pcol]!r}): {name} {str(here).strip()!r} "
                             f"vs {there!r} in the clinical table")
    if conflicts:
        raise CohortError(
            f"{slide_csv} and {clinical_csv} both have the label column(s) {', '.join(n for n in names if n in slides)} "
            f"and disagree on {len(conflicts)} slide row(s): {tables.list_examples(conflicts, 10, '; ')}. Correct the table that is wrong, or remove the "
            f"column from the slide table so that the clinical table alone holds the labels"
        )


def _bag_name(slide_id: str, bags: set[str], suffixes: set[str]) -> str | None:
    """The bag file stem for a slide id: the id itself, or its stem when written with a file extension."""
    if slide_id in bags:
        return slide_id
    name = Path(slide_id).name
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    if suffix in suffixes and stem in bags:
        return stem
    return name if name in bags else None


# File extensions a slide id may carry (slide files and bags) and still match its bag by stem.
SLIDE_SUFFIXES = {".h5", ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif", ".dcm", ".czi",
                  ".qptiff", ".svslide", ".isyntax", ".jpg", ".png"}


class _Skips:
    """Skipped rows with a reason (for skipped.csv) and a short category (for the summary line)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.categories: list[str] = []

    def add(self, kind: str, item_id: str, reason: str, category: str) -> None:
        self.rows.append((kind, item_id, reason))
        self.categories.append(category)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["kind", "id", "reason"])

    def summary(self) -> str:
        """``15 slides without a bag (e.g. a1, a2, a3), 2 patients without slides (e.g. E)``."""
        by: dict[str, list[str]] = {}
        for (_, item_id, _), category in zip(self.rows, self.categories, strict=True):
            by.setdefault(category, []).append(item_id)
        parts = sorted(by.items(), key=lambda kv: -len(kv[1]))
        return ", ".join(f"{len(ids)} {cat} (e.g. {', '.join(map(str, ids[:3]))})" for cat, ids in parts)


def load_cohort(
    cfg: DictConfig, require_labels: bool = True, columns: list[LabelColumn] | None = None,
    unknown_labels: str = "error",
) -> Cohort:
    """Build the cohort described by the ``cohort`` section of a config.

    ``columns`` are the label columns to read (default: ``cohort.target`` as a category with
    ``cohort.classes``); each comes from the clinical table when it has the column, else from
    the slide table. ``require_labels=False`` keeps unlabelled bags and drops absent columns
    (prediction on a new cohort). ``unknown_labels="ignore"`` treats a category value outside
    the column's classes as missing, counted in :attr:`Cohort.unknown_labels` (prediction),
    instead of an error.

    Tables are read by :mod:`mil.tables` (CSV with any separator, TSV, .xlsx; only empty
    cells are missing). A single table with patient, slide and label columns may be given
    as ``slide_csv`` alone, ``clinical_csv`` alone, or both. A slide id written with its file
    extension matches the bag of its stem.
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
    slide_csv, clinical_csv = _table_paths(cfg)
    slides = read_table(slide_csv, [pcol, scol], "slide table")
    _check_unique(slides, scol, slide_csv)
    skipped = _Skips()
    unknown: dict[str, dict[str, int]] = {}

    sources: dict[str, str] = {}
    if clinical_csv:
        clinical = read_table(clinical_csv, [pcol], "clinical table")
        _check_unique(clinical, pcol, clinical_csv)
        here = [c for c in columns if c.name in clinical.columns]
        for c in here:
            _prepare_values(clinical, c, clinical_csv, pcol, unknown_labels, unknown)
            sources[c.name] = str(clinical_csv)
        names = [c.name for c in here]
        _check_ids_match(clinical, slides, pcol, clinical_csv, slide_csv)
        _check_labels_agree(clinical, slides, names, pcol, scol, clinical_csv, slide_csv)
        slides = slides.drop(columns=names, errors="ignore").merge(clinical[[pcol, *names]], on=pcol, how="left")
        for pid in sorted(set(clinical[pcol].dropna()) - set(slides[pcol].dropna())):
            skipped.add("patient", pid, "no slides in the slide table", "patients without slides")
        unknown_rows = slides[~slides[pcol].isin(clinical[pcol])]
        for sid in unknown_rows[scol]:
            skipped.add("slide", sid, "patient not in the clinical table", "slides of patients not in the clinical table")
        slides = slides[slides[pcol].isin(clinical[pcol])]
    for c in [c for c in columns if c.name not in sources]:
        if c.name in slides.columns:
            _prepare_values(slides, c, slide_csv, scol, unknown_labels, unknown)
            sources[c.name] = str(slide_csv)
        elif require_labels:
            where = f"{clinical_csv} or {slide_csv}" if clinical_csv else str(slide_csv)
            available = list(dict.fromkeys([*(clinical.columns if clinical_csv else []), *slides.columns]))
            raise CohortError(f"label column {c.key}={c.name!r} not found in {where}{_suggest(c.name, available)}; "
                              f"columns are {available}")
        else:
            logger.info("no %r column: predicting without it", c.name)
    columns = [c for c in columns if c.name in sources]
    for name, counts in unknown.items():
        logger.warning("%d bag label(s) of %r outside the run's classes %s (%s): predicted, left out of the metrics",
                       sum(counts.values()), name, next(c.classes for c in columns if c.name == name),
                       ", ".join(f"{v!r}: {n}" for v, n in counts.items()))

    features_dir = Path(cfg.features_dir)
    if not features_dir.is_dir():
        raise CohortError(f"cohort.features_dir {tables.describe_path(features_dir)} is not a folder")
    bag_files = {p.stem for p in features_dir.glob("*.h5")}
    infos: dict[str, BagInfo] = {}
    keep, no_bag, used = [], [], set()
    reasons: dict[str, str] = {}  # slide id -> why it was skipped
    renamed: list[tuple[str, str]] = []
    for i, row in slides.iterrows():
        sid, pid = row[scol], row[pcol]
        if pd.isna(sid) or pd.isna(pid):
            raise CohortError(f"{slide_csv}: row {i + 2} has an empty {scol} or {pcol}")
        name = _bag_name(sid, bag_files, SLIDE_SUFFIXES)
        if name is None:
            no_bag.append(sid)
            continue
        if name in used:
            raise CohortError(f"{slide_csv}: slide ids {sid!r} and another row both name the bag {name}.h5")
        used.add(name)
        if name != sid:
            renamed.append((sid, name))
            slides.loc[i, scol] = name
        reason = _missing_reason(row, columns) if require_labels else None
        if reason:
            reasons[sid] = reason
            skipped.add("slide", sid, reason, "slides with a missing label")
            continue
        try:
            infos[name] = read_bag_info(features_dir / f"{name}.h5")
        except EmptyBagError:
            reasons[sid] = "empty bag (0 tiles)"
            skipped.add("slide", sid, f"empty bag {name}.h5 (0 tiles)", "empty bags (0 tiles)")
            continue
        keep.append(i)
    if renamed:
        logger.info("%d slide id(s) written with a file extension matched the bag of their stem (e.g. %s -> %s.h5); "
                    "they are named by the stem", len(renamed), *renamed[0])
    unused = sorted(bag_files - used)
    for sid in no_bag:
        looked = f"{sid}.h5" if Path(sid).stem == sid or Path(sid).suffix.lower() not in SLIDE_SUFFIXES \
            else f"{sid}.h5 or {Path(sid).stem}.h5"
        close = difflib.get_close_matches(sid, unused, n=1, cutoff=0.8)
        reasons[sid] = f"no bag {looked} in {features_dir}" + (f"; closest unused bag: {close[0]}.h5" if close else "")
        skipped.add("slide", sid, reasons[sid], "slides without a bag")
    by_patient = slides.groupby(pcol, sort=True)[scol].apply(list) if len(slides) else pd.Series(dtype=object)
    kept_patients = set(slides.loc[keep, pcol])
    for pid, sids in by_patient.items():
        if pid not in kept_patients:
            why = sorted({reasons.get(s, "skipped").split(" in ")[0].split(";")[0] for s in sids})
            skipped.add("patient", pid, f"all {len(sids)} slide(s) skipped: {'; '.join(why)}", "patients who lost every slide")
    if unused:
        logger.info("%d bag(s) in %s are not in the slide table (e.g. %s)", len(unused), features_dir, ", ".join(unused[:3]))
    slides = slides.loc[keep]
    if not infos:
        looked = ", ".join(f"{s}.h5" for s in no_bag[:3])
        found = ", ".join(f"{s}.h5" for s in sorted(bag_files)[:3])
        raise CohortError(
            f"no usable bags: of the {len(reasons)} slides listed in {slide_csv}, {len(no_bag)} have no bag in "
            f"{tables.describe_path(features_dir)}" + (f" (looked for e.g. {looked}; the folder holds {len(bag_files)} "
                                                       f".h5 file(s){', e.g. ' + found if found else ''})" if no_bag else "")
            + (f"; skipped: {skipped.summary()}" if skipped.rows else "")
        )
    identity = _check_consistent(list(infos.values()), dict(cfg.get("bag_identity") or {}))

    columns = [
        replace(c, classes=sorted(slides[c.name].dropna().unique().tolist()))
        if c.kind == "category" and c.classes is None else c
        for c in columns
    ]
    bags = _group(slides, infos, pcol, scol, columns, cfg.bag_level, sources)
    first = next(iter(infos.values()))
    if skipped.rows:
        logger.warning("skipped %d row(s): %s; every row with its reason in skipped.csv",
                       len(skipped.rows), skipped.summary())
    classes = list(columns[0].classes or []) if columns and columns[0].kind == "category" else []
    logger.info("cohort: %d bags, %d patients, label columns %s", len(bags), len({b.patient_id for b in bags}),
                ", ".join(c.name + (f" {c.classes}" if c.classes else f" ({c.kind})") for c in columns) or "none")
    return Cohort(bags, classes, first.dim, identity, cfg.bag_level, skipped.frame(), columns, unknown)


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
