"""Reading the tables researchers actually have: CSV from any locale, TSV, Excel.

* The separator of a text table is sniffed from its header line (``,``; ``;`` as European
  Excel writes; tab; ``|``), so a ``;`` file never reads as one wide column.
* ``.xlsx`` / ``.xlsm`` workbooks are read with pandas (openpyxl), first sheet.
* Every cell is read as a string and **only empty cells are missing**: a class named
  ``None``, ``NA`` or ``null`` stays a value (pandas would silently drop it as missing), and
  ids keep their leading zeros.
* A UTF-8 byte-order mark (Excel's "CSV UTF-8") is removed; a file that is not UTF-8 is read
  as Windows-1252 (older Excel exports), with a note.
* Errors name the file, and for a relative path the directory it was resolved against.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from io import StringIO
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
SEPARATORS = (",", ";", "\t", "|")
# Strings pandas reads as missing by default. In id and category columns they are values;
# numeric columns (a regression target, a survival time) treat them as missing.
NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


# pandas.read_csv options for tables this toolkit writes (predictions.csv): only empty cells are missing,
# so a class named "None" or "NA" reads back as itself.
ONLY_EMPTY_IS_MISSING = {"keep_default_na": False, "na_values": [""]}


class TableError(ValueError):
    """A table that cannot be read; the message names the file and what to do."""


def describe_path(path: str | os.PathLike) -> str:
    """``path``, plus the directory it was resolved against when it is relative (for messages)."""
    p = Path(path)
    return str(p) if p.is_absolute() else f"{p} (relative to the working directory {Path.cwd()})"


def list_examples(items: Sequence[str], n: int = 6, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` joined by ``sep``, then how many more (for messages): ``a, b and 3 more``."""
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def sniff_separator(header: str) -> str:
    """The separator of a delimited text table, from its header line (``,`` when unclear).

    The candidate that splits the header into the most fields wins; quoted fields are
    respected (``csv`` module), so a comma inside a quoted column name does not count.
    """
    best, best_fields = ",", 1
    for sep in SEPARATORS:
        fields = len(next(csv.reader([header], delimiter=sep), []))
        if fields > best_fields:
            best, best_fields = sep, fields
    return best


def _read_text(path: Path) -> tuple[str, str]:
    """(text, encoding) of a text table: UTF-8 (BOM removed), else Windows-1252."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        logger.warning("%s is not UTF-8; reading it as Windows-1252 (an older Excel export)", path)
        return raw.decode("cp1252", errors="replace"), "cp1252"


def read_any_table(path: str | os.PathLike, what: str = "table") -> pd.DataFrame:
    """Read a CSV / TSV / Excel table with every cell a string; only empty cells are missing.

    Column names and id-like cells are not changed here (see :func:`read_table` for
    stripping); raises :class:`TableError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise TableError(f"{what} {describe_path(path)} does not exist{hint}")
    suffix = path.suffix.lower()
    read_opts = {"dtype": str, **ONLY_EMPTY_IS_MISSING}
    if suffix == ".xls":
        raise TableError(f"{what} {path}: the old .xls format is not read; save it as .xlsx or .csv")
    if suffix in EXCEL_SUFFIXES:
        try:
            return pd.read_excel(path, sheet_name=0, **read_opts)
        except ImportError as e:
            raise TableError(f"{what} {path}: reading Excel needs openpyxl (pip install openpyxl): {e}") from None
        except (ValueError, OSError, KeyError) as e:
            raise TableError(f"{what} {path} cannot be read as an Excel workbook: {e}") from None
    text, _ = _read_text(path)
    if not text.strip():
        raise TableError(f"{what} {path} is empty")
    header = text.lstrip("\r\n").splitlines()[0]
    sep = "\t" if suffix in (".tsv", ".tab") else sniff_separator(header)
    try:
        df = pd.read_csv(StringIO(text), sep=sep, **read_opts)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise TableError(f"{what} {path} cannot be parsed as a {sep!r}-separated table: {e}") from None
    if sep != ",":
        logger.debug("%s: %r-separated", path, sep)
    return df


def read_table(
    path: str | os.PathLike,
    required: Sequence[str],
    what: str,
    aliases: dict[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Read a cohort table and check that the ``required`` columns exist.

    Column names and the required (id) columns are stripped of surrounding spaces; a cell
    that is empty or only spaces is missing. ``aliases`` maps a required column to other
    names that mean the same (e.g. CLAM's ``case_id`` for ``patient_id``); a table without the
    required name but with exactly one alias uses it, with a note.
    """
    path = Path(path)
    df = read_any_table(path, what)
    df.columns = [str(c).strip() for c in df.columns]
    as_written = list(df.columns)  # for the error: the file's own names, before any alias is applied
    missing = [c for c in required if c not in df.columns]
    for column in list(missing):
        lower = {c.lower(): c for c in df.columns}
        found = [lower[a.lower()] for a in [column, *(aliases or {}).get(column, ())] if a.lower() in lower]
        if len(found) == 1 and found[0] not in required:
            logger.info("%s %s: using column %r as %r", what, path, found[0], column)
            df = df.rename(columns={found[0]: column})
            missing.remove(column)
    if missing:
        raise TableError(
            f"{what} {path} has no column {', '.join(map(repr, missing))}; columns are {as_written} "
            "(set cohort.patient_column / cohort.slide_column to the names your table uses)"
        )
    for column in required:
        df[column] = df[column].str.strip().replace("", None)
    return df


def numeric_missing(values: pd.Series) -> pd.Series:
    """``values`` with the usual missing-value spellings (NA, nan, None, ...) as missing.

    For numeric columns only: there the strings cannot be values, so R's ``NA`` and Excel's
    ``#N/A`` mean missing.
    """
    stripped = values.where(values.isna(), values.astype(str).str.strip())
    return stripped.where(~stripped.isin(NA_STRINGS))
