"""Logs a cluster user can read: one line per epoch off a terminal, no Lightning chatter, core without encoders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mil.config import default_workers, load_config
from mil.progress import show_progress_bar

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_progress_bar_setting():
    assert show_progress_bar(True) is True and show_progress_bar(False) is False
    assert show_progress_bar("auto") is sys.stdout.isatty() and show_progress_bar(None) is sys.stdout.isatty()
    assert load_config([]).trainer.enable_progress_bar == "auto"
    with pytest.raises(ValueError, match="true, false or auto"):
        show_progress_bar("sometimes")


def test_default_loader_workers_fit_the_machine():
    assert load_config([]).loader.workers is None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_workers() == min(4, cores)


def test_crossval_log_redirected_to_a_file_is_small(tmp_path, cohort_overrides, fast_overrides):
    """A 30-patient cross-validation with output to a file (as under SLURM): one line per epoch, a few KB."""
    overrides = [o for o in fast_overrides if not o.startswith("trainer.enable_progress_bar")]
    log = tmp_path / "crossval.log"
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "mil", "crossval", *cohort_overrides, *overrides,
                        f"output_dir={tmp_path / 'run'}"], stdout=f, stderr=subprocess.STDOUT, env=_env(),
                       check=True, cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert log.stat().st_size < 60_000, f"{log.stat().st_size} bytes"
    assert "\r" not in text and "it/s" not in text  # no progress bars
    for fold in range(3):
        assert re.search(rf"fold_{fold}: epoch 1/\d+: train_loss", text), text[-3000:]
    assert "val_auroc" in text and "Tip" not in text and "GPU available" not in text


CORE = ["mil.bags", "mil.cohort", "mil.splits", "mil.models", "mil.tasks", "mil.training", "mil.metrics",
        "mil.crossval", "mil.predict", "mil.report", "mil.thresholds", "mil.progress", "mil.attention",
        "mil.plots", "mil.heatmap_render", "mil.importing", "mil.inference", "mil.data", "mil.config"]


def test_python_api_is_quiet_and_core_needs_no_encoders(tmp_path, cohort_overrides, fast_overrides):
    """Training from Python prints no Lightning tips or banners; the core of mil (bags to predictions)
    imports neither the slide layer (encoders) nor timm. One subprocess: importing torch is the slow part."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE)
            + "from mil.config import load_config\nfrom mil.crossval import run_train\n"
            + "run_train(load_config(sys.argv[1:]))\n"
            + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('encoders', 'timm'))\n"
            + "assert not bad, f'core modules imported {bad}'\n")
    done = subprocess.run([sys.executable, "-c", code, *cohort_overrides, *fast_overrides, "train.max_epochs=2",
                           f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=_env(), timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for chatter in ("GPU available", "TPU available", "Tip", "does not have many workers", "Trainer.fit` stopped"):
        assert chatter not in output, output
