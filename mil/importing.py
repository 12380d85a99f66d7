"""Bring your own features: import bags from arrays, a CSV table or a PRTools ``.mat`` file.

Any instance-level feature matrix with a bag id per row becomes a cohort the toolkit reads:

* ``features/<bag_id>.h5``, one bag per id, written with :func:`mil.bags.write_bag`;
* ``slides.csv`` (``patient_id``, ``slide_id``, label) with one row per bag;
* ``clinical.csv`` (``patient_id``, label) with one row per patient.

Each bag is its own patient unless a patient (group) column says otherwise. The tables are
written last, so an interrupted import never looks finished. Then, for example::

    mil crossval cohort.clinical_csv=out/clinical.csv cohort.slide_csv=out/slides.csv \\
        cohort.features_dir=out/features cohort.target=label train.standardize=true ...
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mil.bags import write_bag
from mil.io import atomic_path
from mil.tables import ONLY_EMPTY_IS_MISSING, describe_path

logger = logging.getLogger(__name__)

FORMATS = ("auto", "csv", "mat")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # usable as a file name on every OS
Column = str | int


class BagImportError(ValueError):
    """Input that cannot be imported; the message names the file, column, row or bag."""


@dataclass(frozen=True)
class ImportResult:
    """Where an import wrote its cohort, and what it holds."""

    out_dir: Path
    features_dir: Path
    clinical_csv: Path
    slide_csv: Path
    target: str  # the label column of both tables
    classes: list[str]  # sorted label values (set ``cohort.classes`` to choose the positive class)
    n_bags: int
    n_patients: int
    n_instances: int
    dim: int
    label_counts: dict[str, int]  # bags per label

    def config_overrides(self) -> list[str]:
        """``key=value`` overrides that point a config at this cohort (tables, bags, label column)."""
        return [
            f"cohort.clinical_csv={self.clinical_csv}",
            f"cohort.slide_csv={self.slide_csv}",
            f"cohort.features_dir={self.features_dir}",
            f"cohort.target={self.target}",
        ]

    def classes_override(self) -> str:
        """``cohort.classes=[...]`` with this cohort's labels, sorted, for a config whose classes differ.

        Not part of :meth:`config_overrides`: the last class is the positive one, and sorting
        would make MSS the positive class of MSS / MSI-H labels where the config says MSI-H.
        Names are quoted so that ``no`` / ``yes`` or ``0`` / ``1`` stay strings.
        """
        return f"cohort.classes=[{','.join(json.dumps(c) for c in self.classes)}]"


def _bag_id(value: object, where: str) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)  # 3.0 -> "3": ids read from float arrays or MATLAB doubles
    text = str(value).strip()
    if not _SAFE_ID.match(text):
        raise BagImportError(
            f"{where}: bag id {text!r} cannot be a file name; use letters, digits and . _ + - only "
            "(starting with a letter or digit)"
        )
    return text


_INTEGRAL = re.compile(r"^(-?\d+)\.0*$")  # "3.000000" in a numeric table is the id / label 3


def _as_str(values: np.ndarray) -> np.ndarray:
    out = []
    for v in values:
        if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer():
            v = int(v)
        text = str(v).strip()
        out.append(_INTEGRAL.sub(r"\1", text))
    return np.array(out, dtype=object)


def import_arrays(
    features: np.ndarray,
    bag_ids: Sequence | np.ndarray,
    out_dir: str | Path,
    labels: Sequence | np.ndarray | None = None,
    *,
    patient_ids: Sequence | np.ndarray | None = None,
    target: str = "label",
    embedding: str = "arrays",
    dtype: str = "float32",
    source: str = "arrays",
) -> ImportResult:
    """Import an instance matrix ``features`` [n, D] with one bag id (and label) per row.

    Rows of one bag need not be contiguous; a bag's rows keep their order. Every row of a bag
    must carry the same label (labels are bag labels), and every bag of a patient the same
    patient id. ``embedding`` is recorded in each bag's attributes (it identifies the feature
    space, so bags imported from different sources are not mixed by mistake).
    """
    x = np.asarray(features)
    if x.ndim != 2 or len(x) == 0 or x.shape[1] == 0:
        raise BagImportError(f"{source}: features must be a non-empty [n_instances, n_features] matrix, got {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise BagImportError(f"{source}: features must be real numbers, got dtype {x.dtype}")
    bad = ~np.isfinite(x.astype(np.float64, copy=False))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise BagImportError(f"{source}: feature {col} of row {row} is {x[row, col]} (NaN or inf); {int(bad.any(1).sum())} row(s) affected")
    n = len(x)
    columns = {"bag id": bag_ids, "label": labels, "patient id": patient_ids}
    arrays = {}
    for name, values in columns.items():
        if values is None:
            continue
        values = np.asarray(values, dtype=object).ravel()
        if len(values) != n:
            raise BagImportError(f"{source}: {len(values)} {name}s for {n} feature rows")
        missing = pd.isna(values) | (_as_str(values) == "")
        if missing.any():
            raise BagImportError(f"{source}: row {int(np.argmax(missing))} has no {name}")
        arrays[name] = _as_str(values)

    ids = arrays["bag id"]
    order = pd.unique(ids)  # first-appearance order
    rows_of = pd.Series(np.arange(n)).groupby(ids, sort=False).apply(np.asarray).to_dict()
    bag_names = {b: _bag_id(b, f"{source}, row {int(rows_of[b][0])}") for b in order}
    names = pd.Series(bag_names)
    clash = names[names.duplicated(keep=False)]
    if len(clash):
        raise BagImportError(f"{source}: bag ids {list(clash.index[:2])} map to the same file name {clash.iloc[0]!r}")

    bag_label = _per_bag(arrays.get("label"), order, rows_of, "label", source)
    bag_patient = _per_bag(arrays.get("patient id"), order, rows_of, "patient id", source) or {
        b: bag_names[b] for b in order
    }

    out = Path(out_dir)
    features_dir = out / "features"
    attrs = {"encoder": "imported", "encoder_weights": "none", "embedding": embedding}
    for b in order:
        write_bag(features_dir / f"{bag_names[b]}.h5", x[rows_of[b]], attrs=attrs, dtype=dtype)

    slides = pd.DataFrame({"patient_id": [bag_patient[b] for b in order], "slide_id": [bag_names[b] for b in order]})
    if bag_label is not None:
        slides[target] = [bag_label[b] for b in order]
    clinical = _clinical(slides, target if bag_label is not None else None)
    for name, df in (("clinical.csv", clinical), ("slides.csv", slides)):  # slides.csv last: marks the import finished
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    counts = slides[target].value_counts().sort_index().to_dict() if bag_label is not None else {}
    result = ImportResult(
        out_dir=out,
        features_dir=features_dir,
        clinical_csv=out / "clinical.csv",
        slide_csv=out / "slides.csv",
        target=target,
        classes=sorted(counts),
        n_bags=len(order),
        n_patients=int(slides["patient_id"].nunique()),
        n_instances=n,
        dim=int(x.shape[1]),
        label_counts={str(k): int(v) for k, v in counts.items()},
    )
    logger.info(
        "imported %d bags (%d instances, %d features, labels %s) from %s into %s",
        result.n_bags, n, result.dim, result.label_counts, source, out,
    )
    return result


def _per_bag(
    values: np.ndarray | None, order: np.ndarray, rows_of: dict, what: str, source: str
) -> dict[str, str] | None:
    """The single value of each bag's rows; an error naming the bag when they differ."""
    if values is None:
        return None
    result = {}
    for b in order:
        uniq = pd.unique(values[rows_of[b]])
        if len(uniq) > 1:
            rows = rows_of[b][[int(np.argmax(values[rows_of[b]] == u)) for u in uniq[:2]]]
            raise BagImportError(
                f"{source}: bag {b!r} has rows with different {what}s ({uniq[0]!r} in row {rows[0]}, "
                f"{uniq[1]!r} in row {rows[1]}); a {what} must be the same for every instance of a bag"
            )
        result[b] = uniq[0]
    return result


def _clinical(slides: pd.DataFrame, target: str | None) -> pd.DataFrame:
    """One row per patient, with the label when all of a patient's bags agree on it."""
    if target is None:
        return slides[["patient_id"]].drop_duplicates()
    per_patient = slides.groupby("patient_id", sort=False)[target].nunique()
    if (per_patient > 1).any():
        logger.warning(
            "%d patient(s) have bags with different labels (e.g. %r): labels stay in slides.csv only; "
            "use cohort.bag_level=slide", int((per_patient > 1).sum()), per_patient.index[per_patient.argmax()],
        )
        return slides[["patient_id"]].drop_duplicates()
    return slides[["patient_id", target]].drop_duplicates("patient_id")


def read_prtools_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features, bag_ids, labels)`` of a PRTools MIL ``dataset`` object saved by MATLAB (v5).

    The object is the file's only variable (``x`` in D. Tax's MIL toolbox files); bag ids are
    ``ident.milbag``, labels are the names in ``lablist`` indexed by ``nlab``.
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise BagImportError(f"{path} does not exist") from None
    except (ValueError, NotImplementedError, OSError) as e:  # v7.3 (HDF5) files raise NotImplementedError
        raise BagImportError(f"{path}: not a readable MATLAB v5 file ({e})") from None
    names = [k for k in mat if not k.startswith("__")]
    objects = [k for k in names if getattr(mat[k], "dtype", None) is not None and mat[k].dtype.names]
    if len(objects) != 1:
        raise BagImportError(f"{path}: expected one PRTools dataset struct, found variables {names}")
    obj = mat[objects[0]].ravel()[0]
    fields = set(obj.dtype.names)
    missing = {"data", "nlab", "lablist", "ident"} - fields
    if missing:
        raise BagImportError(f"{path}: variable {objects[0]!r} lacks PRTools field(s) {sorted(missing)}; has {sorted(fields)}")
    x = np.asarray(obj["data"])
    ident = obj["ident"].ravel()[0]
    if ident.dtype.names is None or "milbag" not in ident.dtype.names:
        raise BagImportError(f"{path}: ident has no 'milbag' field (bag ids); is this a MIL dataset?")
    bags = np.asarray(ident["milbag"])
    bags = bags.ravel() if bags.dtype.kind != "U" or bags.ndim == 1 else np.array(["".join(r) for r in bags])
    nlab = np.asarray(obj["nlab"]).ravel().astype(int)
    try:
        lablist = [str(s).strip() for s in np.asarray(obj["lablist"][0, 0]).ravel()]
    except (IndexError, TypeError, ValueError):
        lablist = []
    if lablist and nlab.min() >= 1 and nlab.max() <= len(lablist):
        labels = np.array([lablist[i - 1] for i in nlab], dtype=object)
    else:  # no usable label names: keep the numeric labels
        labels = nlab.astype(str).astype(object)
    if len(bags) != len(x) or len(labels) != len(x):
        raise BagImportError(f"{path}: {len(x)} feature rows but {len(bags)} bag ids and {len(labels)} labels")
    return x, bags, labels


def _resolve(columns: list, spec: Column, what: str, path: Path) -> object:
    if spec in columns:
        return spec
    if isinstance(spec, str) and spec.lstrip("-").isdigit() and int(spec) in columns:
        return int(spec)  # "1" from a command line names column 1 of a header-less table
    raise BagImportError(f"{path}: no {what} column {spec!r}; columns are {columns[:12]}{' ...' if len(columns) > 12 else ''}")


def _has_header(path: Path) -> bool:
    """A first row with any non-numeric cell is a header."""
    first = pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0]
    return bool(pd.to_numeric(first, errors="coerce").isna().any())


def read_table(
    path: str | Path,
    bag_column: Column,
    label_column: Column | None = None,
    feature_columns: Sequence[Column] | None = None,
    patient_column: Column | None = None,
    header: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(features, bag_ids, labels, patient_ids)`` from a CSV with one instance per row.

    Columns are names, or 0-based positions in a table without a header (``header=None``
    detects one). ``feature_columns=None`` takes every other column.
    """
    path = Path(path)
    if not path.is_file():
        raise BagImportError(f"table {describe_path(path)} does not exist")
    try:
        if header is None:
            header = _has_header(path)
        df = pd.read_csv(path, header=0 if header else None, dtype=str, **ONLY_EMPTY_IS_MISSING)  # label "None" is a label
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BagImportError(f"{path}: cannot be parsed as CSV ({e})") from None
    if header:
        df.columns = [str(c).strip() for c in df.columns]
    columns = list(df.columns)
    bag = _resolve(columns, bag_column, "bag", path)
    label = _resolve(columns, label_column, "label", path) if label_column is not None else None
    patient = _resolve(columns, patient_column, "patient", path) if patient_column is not None else None
    ids = [c for c in (bag, label, patient) if c is not None]
    if feature_columns is None:
        feats = [c for c in columns if c not in ids]
    else:
        feats = [_resolve(columns, c, "feature", path) for c in feature_columns]
        overlap = [c for c in feats if c in ids]
        if overlap:
            raise BagImportError(f"{path}: column {overlap[0]!r} is both a feature and the bag/label/patient column")
    if not feats:
        raise BagImportError(f"{path}: no feature columns left besides {ids}")
    values = df[feats].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        line = r + (2 if header else 1)  # 1-based line in the file
        raise BagImportError(f"{path}: line {line}, column {feats[c]!r}: {df.iloc[r][feats[c]]!r} is not a number")
    x = values.to_numpy(dtype=np.float64)
    pick = {c: df[c].to_numpy(dtype=object) for c in ids}
    return x, pick[bag], pick.get(label) if label is not None else None, pick.get(patient) if patient is not None else None


def import_bags(
    source: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "auto",
    bag_column: Column | None = None,
    label_column: Column | None = None,
    feature_columns: Sequence[Column] | None = None,
    patient_column: Column | None = None,
    header: bool | None = None,
    target: str = "label",
    dtype: str = "float32",
) -> ImportResult:
    """Import instance features from ``source`` (a ``.csv`` table or a PRTools ``.mat``) into ``out_dir``.

    ``fmt``: ``"csv"``, ``"mat"`` or ``"auto"`` (from the file extension). For a CSV,
    ``bag_column`` is required; ``label_column``, ``patient_column`` and ``feature_columns``
    (default: all other columns) are optional; columns are header names, or 0-based
    positions when the table has no header (detected unless ``header`` is given). A ``.mat``
    file carries its own bag ids and labels, so the column options must be left unset.
    Labels land in column ``target`` of ``clinical.csv`` and ``slides.csv``. Features are
    stored as ``dtype`` (float32 keeps low-dimensional raw values such as Musk's exact).
    """
    source = Path(source)
    if fmt not in FORMATS:
        raise BagImportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = {".csv": "csv", ".txt": "csv", ".tsv": "csv", ".mat": "mat"}.get(source.suffix.lower(), "")
        if not fmt:
            raise BagImportError(f"{source}: cannot tell the format from the extension; pass fmt='csv' or fmt='mat'")
    if fmt == "mat":
        given = {k: v for k, v in [("bag_column", bag_column), ("label_column", label_column),
                                   ("feature_columns", feature_columns), ("patient_column", patient_column)] if v is not None}
        if given:
            raise BagImportError(f"{source}: a .mat file has its own bag ids and labels; do not pass {', '.join(given)}")
        x, bags, labels = read_prtools_mat(source)
        patients = None
    else:
        if bag_column is None:
            raise BagImportError(f"{source}: name the bag id column (bag_column)")
        x, bags, labels, patients = read_table(source, bag_column, label_column, feature_columns, patient_column, header)
    return import_arrays(
        x, bags, out_dir, labels, patient_ids=patients, target=target, embedding=source.name, dtype=dtype, source=str(source)
    )
