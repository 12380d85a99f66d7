"""Cross-validation folds as separate jobs on one shared run folder.

Any number of ``mil crossval CONFIG --fold K`` processes (SLURM array tasks, submitit jobs,
terminals) may start at the same moment on one ``output_dir``:

* ``.locks/run.lock`` serialises writing the run's metadata: the first process writes
  ``config.yaml`` and ``splits.yaml``, the others wait, then check that their config matches
  (the usual resume check) and read the same splits;
* ``.locks/<fold>.lock`` is held while a fold trains, so two jobs never train one fold; a
  process that dies (killed, out of memory, time limit) releases it with its file handles;
* with averaged inner models (``cv.inner_folds``), ``<fold>/.locks/inner_<j>.lock`` is held while
  one trains: a local ``cv.jobs`` process with no fold left trains inner models of a fold
  another holds, which that fold's process loads (:mod:`mil.ensemble`);
* a fold that raises leaves ``<fold>/failed.txt`` (the traceback) for ``mil status``;
* the pooled outputs are written under the run lock by whichever job sees every fold finished
  and the pooled files older than the folds, so they are written once.

Locks are ``fcntl``/``flock`` locks through `filelock <https://py-filelock.readthedocs.io>`_:
they work on local disks and NFSv4; Lustre needs the ``flock`` mount option.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from mil.config import usable_cores
from mil.io import write_text

logger = logging.getLogger(__name__)

LOCK_DIR = ".locks"
FAILED_FILE = "failed.txt"  # in the fold's folder: the traceback of its last failure
DONE_FILE = "predictions.csv"  # in the fold's folder: written last, atomically
MEMBER_FILE = "member.json"  # in a fold's inner_<j>/ (mil.ensemble): written last, the inner model is finished
POOLED_FILES = ("predictions.csv", "metrics.json", "summary.md")
# Where and how jobs run; never part of what a run computes (so a resumed run may change them).
LAUNCHER_KEYS = {"launcher.partition", "launcher.time", "launcher.gpus", "launcher.cpus", "launcher.mem", "cv.jobs"}
# cv.jobs=auto trains folds in parallel processes only when each fold plans at least this much work, in
# tile-features (optimiser steps x tiles per step x feature width): below it a fold takes a few seconds,
# and starting a process (importing torch and Lightning) took about 10 s on the 2-core machine.
MIN_WORK_FOR_PROCESSES = 10**7
# Keys that never change what a run computes: a resumed run may differ in these, and a saved inner model
# (mil.ensemble) does not record them.
RESULT_FREE_KEYS = {"output_dir", "trainer.enable_progress_bar", "trainer.logger", "train.num_workers",
                    "cv.split_file"} | LAUNCHER_KEYS
MAX_AUTO_JOBS = 8  # each process holds its own copy of the cached bags

FINISHED, RUNNING, FAILED, INTERRUPTED, NOT_STARTED = "finished", "running", "failed", "interrupted", "not started"


def _lock_path(out: Path, name: str) -> Path:
    folder = Path(out) / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.lock"


def run_lock(out: str | os.PathLike, enabled: bool = True) -> FileLock | nullcontext:
    """Exclusive lock on a run folder's metadata and pooled files (blocks until free)."""
    return FileLock(_lock_path(Path(out), "run")) if enabled else nullcontext()


def select_folds(n_folds: int, requested: Sequence[int] | None) -> list[int]:
    """Indices of the folds to run: all when ``requested`` is None, else those asked for, in order.

    Raises ``ValueError`` naming every index outside ``0 .. n_folds - 1``.
    """
    if requested is None:
        return list(range(n_folds))
    bad = sorted({k for k in requested if not 0 <= k < n_folds})
    if bad:
        raise ValueError(
            f"--fold {', '.join(map(str, bad))}: the run has {n_folds} folds, numbered 0 to {n_folds - 1} "
            "over all repeats in the order of splits.yaml"
        )
    return list(dict.fromkeys(requested))


@contextmanager
def fold_job(out: Path, fold_name: str, enabled: bool = True, wait: bool = True) -> Iterator[bool]:
    """Hold the fold's lock while it trains; record a failure in ``<fold>/failed.txt``.

    Yields whether this process holds the fold. With ``wait`` it blocks while another process
    holds the fold (and yields True), so the caller must check whether the fold is finished
    after entering; without, it yields False at once when the fold is taken (local parallel
    workers share out the folds this way). ``enabled=False`` (DDP ranks other than 0, which
    train the same fold as rank 0) takes no lock and records nothing.
    """
    if not enabled:
        yield True
        return
    fold_dir = Path(out) / fold_name
    with exclusive(out, fold_name, wait, waiting=lambda: f"{fold_name} is being trained by another job "
                   f"({_owner(out, fold_name)}); waiting for it") as mine:
        if not mine:
            yield False
            return
        write_text(_owner_path(out, fold_name), _describe_self())
        (fold_dir / FAILED_FILE).unlink(missing_ok=True)
        try:
            yield True
        except Exception:  # a Ctrl-C or a kill is an interruption, not a failure
            fold_dir.mkdir(parents=True, exist_ok=True)
            write_text(fold_dir / FAILED_FILE, f"{_describe_self()}\n{traceback.format_exc()}")
            raise


@contextmanager
def exclusive(folder: str | os.PathLike, name: str, wait: bool = True, waiting: Callable[[], str] | None = None
              ) -> Iterator[bool]:
    """Hold the lock ``folder/.locks/<name>.lock`` (a fold, one inner model of a fold) while the block runs.

    Yields whether this process holds it: with ``wait`` it blocks while another process does
    (first logging ``waiting()``, when given); without, it yields False at once.
    """
    lock = FileLock(_lock_path(Path(folder), name))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            yield False
            return
        if waiting is not None:
            logger.info("%s", waiting())
        lock.acquire()
    try:
        yield True
    finally:
        lock.release()


def is_running(out: str | os.PathLike, fold_name: str) -> bool:
    """Whether a process holds the fold's lock (it is training the fold) and it is unfinished."""
    return _fold_state(Path(out), fold_name)[0] == RUNNING


def local_jobs(setting: Any, n_units: int, work_per_fold: float, on_cpu: bool, cores: int | None = None) -> int:
    """How many processes train folds at once on this machine (``cv.jobs``).

    ``n_units``: the units of work left: folds, or their inner models when those are averaged
    (a process with no fold left trains inner models of the others', :mod:`mil.ensemble`).
    ``setting``: a positive int (at most ``n_units`` are used), or ``"auto"``: ``min(n_units,
    cores, 8)`` when training runs on the CPU, at least two units are to run, there are at least
    two cores and each fold plans at least 1e7 tile-features of work (``work_per_fold``:
    optimiser steps x tiles per step x feature width); else 1. On a GPU ``auto`` is 1.
    Why: at batch size 1 a fold is a long chain of small steps that keeps two cores busy only in
    part, and the Python work between kernels never runs in parallel within a process
    (near_normal_120, 5 folds on 2 cores: 249 s in one process with 2 threads, 148 s in two
    with one each; docs/benchmarks.md §2). Raises ``ValueError`` unless ``setting`` is a
    positive int or "auto".
    """
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        cores = usable_cores() if cores is None else cores
        if not on_cpu or n_units < 2 or cores < 2 or work_per_fold < MIN_WORK_FOR_PROCESSES:
            return 1
        return min(n_units, cores, MAX_AUTO_JOBS)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"cv.jobs must be a positive number of processes or auto, got {setting!r}")
    return max(1, min(setting, n_units))


class LogsToParent(logging.Handler):
    """A worker process's handler: each record as one JSON line on stdout, for :func:`relay_logs`.

    The parent logs them through its own loggers, so a run in several processes reads (and is
    captured, e.g. by a log file or pytest's ``caplog``) as one in a single process would.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                      "msg": record.getMessage(), "created": record.created, "process": record.process,
                      "exc_text": self.formatter.formatException(record.exc_info) if record.exc_info and self.formatter
                      else record.exc_text}
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def relay_logs(stream: IO[str]) -> threading.Thread:
    """Log the records a worker writes with :class:`LogsToParent` through this process's loggers.

    Reads ``stream`` (the worker's stdout) in a daemon thread until it closes; returns the thread.
    Lines that are not such records are logged as they are.
    """

    def pump() -> None:
        for line in stream:
            try:
                fields = json.loads(line)
                record = logging.makeLogRecord({**fields, "args": None})
            except (ValueError, TypeError):
                if line.strip():
                    logger.info("%s", line.rstrip())
                continue
            target = logging.getLogger(record.name)
            if target.isEnabledFor(record.levelno):
                target.handle(record)

    thread = threading.Thread(target=pump, name="mil-worker-logs", daemon=True)
    thread.start()
    return thread


def pooled_is_current(out: Path, fold_names: Sequence[str]) -> bool:
    """Whether the pooled outputs exist and are newer than every fold's predictions."""
    pooled = [Path(out) / name for name in POOLED_FILES]
    if not all(p.is_file() for p in pooled):
        return False
    newest_fold = max((Path(out) / f / DONE_FILE).stat().st_mtime for f in fold_names)
    return min(p.stat().st_mtime for p in pooled) >= newest_fold


# ------------------------------------------------------------------------------------- status
@dataclass
class FoldStatus:
    """One fold of a run folder as ``mil status`` reports it."""

    index: int
    name: str
    repeat: int
    state: str  # finished, running, failed, interrupted or not started
    detail: str  # e.g. the last line of a failure, or who holds the lock


@dataclass
class RunStatus:
    run_dir: Path
    folds: list[FoldStatus]
    pooled: bool  # pooled predictions.csv / metrics.json are current

    def counts(self) -> dict[str, int]:
        return {s: sum(f.state == s for f in self.folds) for s in (FINISHED, RUNNING, FAILED, INTERRUPTED, NOT_STARTED)}

    def table(self) -> str:
        """A plain-text table, one fold per line, then a summary line."""
        rows = [("fold", "index", "repeat", "state", "detail")]
        rows += [(f.name, str(f.index), str(f.repeat), f.state, f.detail) for f in self.folds]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        pooled = "pooled results are current" if self.pooled else "pooled results not written yet"
        return "\n".join([f"{self.run_dir}: {len(self.folds)} folds: {counts}; {pooled}", *lines])


def run_status(run_dir: str | os.PathLike) -> RunStatus:
    """The state of every fold of a ``mil crossval`` run folder.

    A fold is *finished* when its ``predictions.csv`` exists, *running* while a process holds
    its lock (the detail counts its finished inner models, ``cv.inner_folds``), *failed* when its
    last attempt left ``failed.txt`` (the detail is the error's last line), *interrupted* when it was started but no process holds it (killed: out of memory,
    time limit), else *not started*. Raises ``FileNotFoundError`` when ``splits.yaml`` is absent.
    """
    out = Path(run_dir)
    splits = out / "splits.yaml"
    if not splits.is_file():
        raise FileNotFoundError(f"{splits} does not exist: {out} is not a started `mil crossval` run folder")
    raw: Any = OmegaConf.to_container(OmegaConf.load(splits))
    folds = []
    for i, item in enumerate(raw):
        name = str(item.get("name", f"fold_{i}"))
        state, detail = _fold_state(out, name)
        folds.append(FoldStatus(i, name, int(item.get("repeat", 0)), state, detail))
    names = [f.name for f in folds]
    done = all(f.state == FINISHED for f in folds)
    return RunStatus(out, folds, pooled=done and pooled_is_current(out, names))


def _fold_state(out: Path, name: str) -> tuple[str, str]:
    fold_dir = out / name
    if (fold_dir / DONE_FILE).is_file():
        return FINISHED, ""
    lock_file = out / LOCK_DIR / f"{name}.lock"
    if lock_file.exists():
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            started = _owner_path(out, name).stat().st_mtime if _owner_path(out, name).is_file() else 0.0
            inner = sum(p.stat().st_mtime >= started for p in fold_dir.glob(f"inner_*/{MEMBER_FILE}"))
            return RUNNING, _owner(out, name) + (f"; {inner} inner model(s) finished" if inner else "")
        lock.release()
    failed = fold_dir / FAILED_FILE
    if failed.is_file():
        lines = [line.strip() for line in failed.read_text().splitlines() if line.strip()]
        return FAILED, lines[-1] if lines else "failed"
    if fold_dir.is_dir():
        return INTERRUPTED, f"started by {_owner(out, name)}; no process holds it (killed?)"
    return NOT_STARTED, ""


def _owner_path(out: Path, name: str) -> Path:
    return Path(out) / LOCK_DIR / f"{name}.owner"


def _owner(out: Path, name: str) -> str:
    path = _owner_path(out, name)
    return path.read_text().strip() if path.is_file() else "unknown process"


def _describe_self() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"host {socket.gethostname()} pid {os.getpid()}" + (f" slurm job {job}" if job else "") + f" since {started}"
