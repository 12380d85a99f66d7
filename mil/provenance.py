"""What a run's results were computed from, recorded beside them and compared on a rerun.

A finished fold (or `mil train` model) keeps a ``provenance.json``: the patients of each side
of its split, and for every bag those patients contribute, its label values and the identity
of its files (size in bytes and modification time in nanoseconds). A rerun into the same
folder rebuilds the record from the current cohort and compares: a fold whose record differs
is redone, and the log names what changed (patients added or removed, labels changed, bag
files changed). Size + mtime is the identity ``make`` and ``rsync`` use: cheap for
terabyte cohorts; copying bags to a new place without ``cp -p`` therefore redoes the folds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mil.bags import BagError, count_nonfinite_tiles
from mil.cohort import Bag, Cohort
from mil.io import write_json
from mil.splits import Fold
from mil.tables import list_examples

logger = logging.getLogger(__name__)

RECORD_FILE = "provenance.json"
SCAN_FILE = "bag_scan.json"  # bags found finite, by file identity: a rerun scans only changed bags
RECORD_VERSION = 1
SIDES = ("train", "val", "test")
# Files whose presence means a run folder holds finished results that a new config must not mix with:
# a finished fold's predictions (written last), a `mil train` model or inner model (written last), pooled predictions.
# An inner model of a fold is finished once its member.json is written (mil.ensemble).
_FINISHED = ("predictions.csv", "model.safetensors", "inner_*/model.safetensors", "*/predictions.csv", "*/inner_*/member.json")


def file_identity(path: Path) -> list[int]:
    """``[size in bytes, modification time in ns]`` of a file."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def bag_record(bag: Bag) -> dict[str, Any]:
    """A bag's patient, label values and file identities (by file name)."""
    return {
        "patient": bag.patient_id,
        "labels": dict(bag.labels),
        "files": {p.name: file_identity(p) for p in bag.paths},
    }


def split_record(cohort: Cohort, split: dict[str, Iterable[str]]) -> dict[str, Any]:
    """The record of a model trained and evaluated on ``split`` (side -> patient ids) of ``cohort``."""
    sides = {side: sorted(str(p) for p in split.get(side, [])) for side in SIDES}
    patients = {p for members in sides.values() for p in members}
    bags = {b.bag_id: bag_record(b) for b in cohort.bags if b.patient_id in patients}
    return {"version": RECORD_VERSION, "split": sides, "bags": bags}


def fold_record(cohort: Cohort, fold: Fold) -> dict[str, Any]:
    return split_record(cohort, {"train": fold.train, "val": fold.val, "test": fold.test})


def write_record(folder: Path, record: dict[str, Any]) -> None:
    write_json(folder / RECORD_FILE, record)


def read_record(folder: Path) -> dict[str, Any] | None:
    """The saved record, or None when there is none (a run from before records) or it is unreadable."""
    path = folder / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("%s is unreadable (%s): treating it as missing", path, e)
        return None


def split_changes(saved: dict[str, list[str]], now: dict[str, list[str]]) -> list[str]:
    """Human-readable differences between two splits (side -> patient ids)."""
    changes = []
    for side in SIDES:
        before, after = set(saved.get(side, [])), set(now.get(side, []))
        if before != after:
            parts = []
            if after - before:
                parts.append(f"+{len(after - before)} ({list_examples(sorted(after - before))})")
            if before - after:
                parts.append(f"-{len(before - after)} ({list_examples(sorted(before - after))})")
            changes.append(f"{side} patients differ: {', '.join(parts)}")
    return changes


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two records' bags: patients, labels, bag files."""
    old, new = saved.get("bags", {}), now.get("bags", {})
    changes = []
    removed, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    if removed:
        changes.append(f"{len(removed)} bag(s) no longer in the cohort: {list_examples(sorted(removed))}")
    if added:
        changes.append(f"{len(added)} new bag(s): {list_examples(sorted(added))}")
    relabelled, refiled = [], []
    for bag_id in sorted(old.keys() & new.keys()):
        a, b = old[bag_id], new[bag_id]
        for column in sorted(a["labels"].keys() | b["labels"].keys()):
            if a["labels"].get(column) != b["labels"].get(column):
                relabelled.append(f"{bag_id} {column} {a['labels'].get(column)!r} -> {b['labels'].get(column)!r}")
        if a["files"] != b["files"]:
            names = sorted(n for n in a["files"].keys() | b["files"].keys() if a["files"].get(n) != b["files"].get(n))
            refiled.append(f"{bag_id} ({', '.join(names)})")
    if relabelled:
        changes.append(f"{len(relabelled)} label(s) changed: {list_examples(sorted(relabelled))}")
    if refiled:
        changes.append(f"bag files changed (size or modification time) for {len(refiled)} bag(s): {list_examples(sorted(refiled))}")
    return changes


def record_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """Everything that differs between a saved record and the current one (empty: nothing)."""
    if saved is None:
        return ["no record of the data it was computed from (made by an older version)"]
    if saved.get("version") != RECORD_VERSION:
        return [f"record version {saved.get('version')!r} is not {RECORD_VERSION}"]
    return split_changes(saved.get("split", {}), now["split"]) + data_changes(saved, now)


def finished_work(out: Path) -> list[Path]:
    """Result files in a run folder that a rerun would keep (fold or model outputs)."""
    return sorted(p for pattern in _FINISHED for p in out.glob(pattern))


def check_bags_finite(cohort: Cohort, out: Path | None = None) -> None:
    """Scan every bag of the cohort once for NaN/inf features before any training starts.

    Raises :class:`BagError` listing every bad file (with its number of bad tiles), so a
    cohort is fixed in one go instead of one failed fold at a time, hours in. Files found
    clean are remembered in ``out/bag_scan.json`` by path, size and modification time, so a
    rerun scans only new or changed bags.
    """
    cache_path = out / SCAN_FILE if out is not None else None
    cache: dict[str, list[int]] = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    paths = sorted({p for bag in cohort.bags for p in bag.paths})
    clean: dict[str, list[int]] = {}
    bad: list[str] = []
    scanned = 0
    for path in paths:
        key, identity = str(path), file_identity(path)
        if cache.get(key) == identity:
            clean[key] = identity
            continue
        scanned += 1
        try:
            n_bad = count_nonfinite_tiles(path)
        except BagError as e:
            bad.append(str(e))
            continue
        if n_bad:
            bad.append(f"{path}: NaN or inf in {n_bad} tile(s)")
        else:
            clean[key] = identity
    if scanned:
        logger.info("checked %d bag file(s) for NaN/inf features (%d known clean)", scanned, len(paths) - scanned)
    if cache_path is not None and clean != cache and _is_main_process():
        write_json(cache_path, clean)
    if bad:
        raise BagError(
            f"{len(bad)} of {len(paths)} bag file(s) cannot be used:\n  " + "\n  ".join(bad)
            + "\nRe-extract these slides, or remove them from the slide table"
        )


def _is_main_process() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
