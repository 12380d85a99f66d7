"""Exit status of commands that carry on past per-item failures.

``mil extract`` (and ``mil predict`` / ``mil demo``, which extract slides first) log a failing
slide, list it with its reason in the summary CSV and go on with the next one, so one bad file
does not cost a night's run. The library functions return as before; the command layer reads
the summaries afterwards and turns any failure into exit status :data:`FAILED_EXIT`, so a SLURM
job or a shell script (``set -e``, ``&&``) does not take a partial run for a finished one.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

FAILED_EXIT = 1  # some items failed; everything else was done and written


def _failed_status() -> str:
    """The ``status`` of a failed row, as :mod:`encoders.extract` writes it (the command layer may import encoders)."""
    from encoders.extract import FAILED

    return FAILED


def count_failed(summary: Path) -> tuple[int, int]:
    """``(failed, total)`` rows of a summary CSV with a ``status`` column; ``(0, 0)`` when it is missing."""
    if not summary.is_file():
        return 0, 0
    with summary.open(newline="") as f:
        statuses = [row.get("status", "") for row in csv.DictReader(f)]
    failed = _failed_status()
    return sum(s == failed for s in statuses), len(statuses)


def exit_status(command: str, summaries: Iterable[Path | None], item: str = "slide") -> int:
    """0 when no row of ``summaries`` failed; else log one error line and return :data:`FAILED_EXIT`.

    The error names how many ``item``\\ s failed and the summary file(s) that hold each one's
    reason. ``None`` entries (nothing was processed) are ignored.
    """
    failed, total, where = 0, 0, []
    for path in summaries:
        if path is None:
            continue
        n_failed, n = count_failed(Path(path))
        failed, total = failed + n_failed, total + n
        if n_failed:
            where.append(str(path))
    if not failed:
        return 0
    kept = "; the others' outputs are written" if failed < total else ""
    logger.error("mil %s: %d of %d %ss failed%s. The reason for each is in %s (rows with status %s); "
                 "fix them and rerun the same command to redo only those", command, failed, total, item, kept,
                 " and ".join(where), _failed_status())
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun stops every process when one exits non-zero, and these processes do not wait for each
        # other: one bad slide in an early shard would cut the other shards short.
        logger.error("mil %s: exit status 0 under torchrun so that the other processes finish their shards; a "
                     "rerun without torchrun retries the failed %ss and exits %d if they fail again",
                     command, item, FAILED_EXIT)
        return 0
    return FAILED_EXIT
