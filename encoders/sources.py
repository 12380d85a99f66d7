"""Which slides to extract: a folder scanned for slide files, or a CSV list; and sharding."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from encoders.slides import SlideRef
from mil.config import ConfigError
from mil.tables import TableError, describe_path, read_any_table

logger = logging.getLogger(__name__)

DICOM_SUFFIX = ".dcm"


def _from_dir(root: Path, extensions: Sequence[str]) -> list[SlideRef]:
    if not root.is_dir():
        raise ConfigError(f"slides.dir={describe_path(root)} is not a folder")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts
                   and not p.name.startswith("."))
    refs: list[SlideRef] = []
    dicom_dirs: set[Path] = set()
    for path in files:
        if path.suffix.lower() == DICOM_SUFFIX:
            # A DICOM slide is a folder of instances; OpenSlide opens it from any one of them.
            if path.parent in dicom_dirs:
                continue
            dicom_dirs.add(path.parent)
            slide_id = path.stem if path.parent == root else path.parent.name
        else:
            slide_id = path.stem
        refs.append(SlideRef(slide_id, path))
    return refs


def _mpp_value(value: object, csv: Path, row: int) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    try:
        mpp = float(str(value).strip().replace(",", "."))  # 0,25 from a European spreadsheet
    except ValueError:
        raise ConfigError(f"{csv}: row {row}: mpp {value!r} is not a number") from None
    if not mpp > 0:
        raise ConfigError(f"{csv}: row {row}: mpp {mpp} must be positive")
    return mpp


def _from_csv(csv: Path, slides: DictConfig) -> list[SlideRef]:
    try:  # CSV with any separator, TSV or .xlsx; every cell text, only empty cells missing
        table = read_any_table(csv, "slides.csv")
    except TableError as e:
        raise ConfigError(str(e)) from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in (slides.slide_column, slides.path_column) if c not in table.columns]
    if missing:
        raise ConfigError(
            f"{csv}: missing column(s) {missing}; found {list(table.columns)} "
            f"(set slides.slide_column / slides.path_column)"
        )
    base = Path(slides.dir) if slides.dir else csv.parent  # relative paths
    refs = []
    for i, row in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        slide_id, raw = row[slides.slide_column], row[slides.path_column]
        if not isinstance(slide_id, str) or not isinstance(raw, str) or not slide_id or not raw:
            raise ConfigError(f"{csv}: row {i}: empty {slides.slide_column} or {slides.path_column}")
        path = Path(raw).expanduser()
        refs.append(SlideRef(slide_id, path if path.is_absolute() else base / path,
                             _mpp_value(row.get("mpp"), csv, i)))
    return refs


def list_slides(slides: DictConfig) -> list[SlideRef]:
    """All slides of the config's ``slides`` section, sorted by id; duplicate ids are an error."""
    if slides.csv:
        refs = _from_csv(Path(slides.csv), slides)
        source = str(slides.csv)
    elif slides.dir:
        refs = _from_dir(Path(slides.dir), list(slides.extensions))
        source = str(slides.dir)
    else:
        raise ConfigError("`mil extract` needs slides.dir (a folder of slides) or slides.csv (a slide list)")
    seen: dict[str, Path] = {}
    for ref in refs:
        if ref.slide_id in seen:
            raise ConfigError(
                f"{source}: slide id {ref.slide_id!r} appears twice ({seen[ref.slide_id]} and {ref.path}); "
                f"bags are named by slide id, so ids must be unique (use slides.csv to name them)"
            )
        seen[ref.slide_id] = ref.path
    if not refs:
        raise ConfigError(f"{source}: no slides found (extensions: {', '.join(slides.extensions)})")
    return sorted(refs, key=lambda r: r.slide_id)


def check_shard(shard: tuple[int, int]) -> None:
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"shard {i}/{n}: expected 0 <= i < n")


def shard_slides(refs: Sequence[SlideRef], shard: tuple[int, int]) -> list[SlideRef]:
    """Every n-th slide from the i-th: the n shards are disjoint and cover every slide."""
    check_shard(shard)
    i, n = shard
    return list(refs[i::n])
