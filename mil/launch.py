"""``mil crossval ... --launcher slurm``: one job per fold through `submitit`_, then pooling.

The launching process validates the config and writes ``config.yaml`` and ``splits.yaml``
first (so a bad config fails before anything is queued), submits one job per fold as a SLURM
job array with the resources of ``launcher.*``, waits for them, and pools. Each job runs
:func:`mil.crossval.run_crossval` with one fold, so it shares the locking, resume and pooling of
``--fold`` jobs (:mod:`mil.jobs`). Job logs and submitit's files go to ``<output_dir>/jobs/``.

``launcher="local"`` runs the same jobs as processes on this machine (submitit's local
executor), ``"debug"`` in this process; both are for testing a setup before queueing it.

.. _submitit: https://github.com/facebookincubator/submitit
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mil.config import load_config
from mil.crossval import prepare_crossval, run_crossval
from mil.jobs import run_status, select_folds

logger = logging.getLogger(__name__)

LAUNCHERS = ("slurm", "local", "debug")


class LaunchError(ValueError):
    """One or more fold jobs failed; the message names each fold and its error (the CLI prints it as-is)."""


def run_fold_job(config: dict[str, Any], fold: int) -> str:
    """Body of one submitted job: train fold ``fold`` of ``config`` (a resolved config as a dict)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(base=OmegaConf.create(config))
    return str(run_crossval(cfg, folds=[fold]))


def launch_crossval(cfg: DictConfig, launcher: str = "slurm", folds: Sequence[int] | None = None) -> Path:
    """Run the folds of ``cfg`` as submitit jobs (one per fold, a job array) and pool their results.

    ``launcher``: "slurm", "local" (processes on this machine) or "debug" (in this process).
    Resources per job come from ``launcher.partition`` / ``time`` (minutes) / ``gpus`` / ``cpus``
    / ``mem`` (GiB). Blocks until the jobs end; returns the run folder. Raises ``ImportError``
    with the install command when submitit is missing, :class:`LaunchError` naming every
    failed fold (the others' results are kept; rerun to redo only those).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    try:
        import submitit
    except ImportError:
        raise ImportError("--launcher needs submitit: pip install -e '.[slurm]' in the checkout (or pip install 'submitit>=1.5')") from None
    out, n_folds = prepare_crossval(cfg)
    todo = [k for k in select_folds(n_folds, folds) if run_status(out).folds[k].state != "finished"]
    container = OmegaConf.to_container(cfg, resolve=True)
    if todo:
        executor = submitit.AutoExecutor(folder=out / "jobs" / "%j", cluster=launcher)
        lc = cfg.launcher
        executor.update_parameters(
            name=f"mil-{out.name}", timeout_min=int(lc.time), gpus_per_node=int(lc.gpus), cpus_per_task=int(lc.cpus),
            mem_gb=int(lc.mem), tasks_per_node=1, nodes=1,
            **({"slurm_partition": lc.partition} if lc.partition else {}),
        )
        with executor.batch():
            jobs = [executor.submit(run_fold_job, container, k) for k in todo]
        logger.info("submitted %d fold jobs (%s) with %s; logs in %s", len(jobs), ", ".join(j.job_id for j in jobs[:3])
                    + (" ..." if len(jobs) > 3 else ""), launcher, out / "jobs")
        failures = []
        for k, job in zip(todo, jobs, strict=True):
            try:
                job.result()
            except Exception as e:  # report every failed fold, not only the first
                lines = [line for line in str(e).splitlines() if line.strip()]
                failures.append(f"fold {k} (job {job.job_id}): {lines[-1] if lines else type(e).__name__}")
        if failures:
            raise LaunchError(f"{len(failures)} of {len(jobs)} fold jobs failed; rerun the same command to redo "
                              f"only those (logs in {out / 'jobs'}):\n  " + "\n  ".join(failures))
    run_crossval(cfg, folds=[])  # pools, unless the last job already did
    return out
