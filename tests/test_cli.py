"""The `mil` command: version, help without heavy imports, subcommands calling library functions."""

from __future__ import annotations

import shlex
import subprocess
import sys

import numpy as np
import pandas as pd

from mil import __version__
from mil.cli import main


def test_version_and_help_are_light():
    code = "import sys; from mil.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", "mil --help must not import torch, lightning or timm"
    proc = subprocess.run([sys.executable, "-m", "mil", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == f"mil {__version__}"


def test_print_config(capsys):
    assert main(["print-config", "configs/examples/msi.yaml", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "target: MSI" in out


def test_bad_override_is_one_line(capsys):
    assert main(["print-config", "train.lrr=1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mil print-config: error: override 'train.lrr=1': unknown config key 'train.lrr'; did you mean 'train.lr'?"
    )


def test_import_bags_then_cohort_loads(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [[b % 2, b, *rng.standard_normal(4)] for b in range(6) for _ in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "bags.csv", index=False, header=False)
    assert main(["import-bags", str(tmp_path / "bags.csv"), str(tmp_path / "out"), "--bag-column", "1",
                 "--label-column", "0"]) == 0
    out = capsys.readouterr().out
    assert "imported 6 bags (18 instances, 4 features)" in out
    overrides = shlex.split(out.split("mil crossval CONFIG ")[1].splitlines()[0])  # as a shell reads the line
    from mil.cohort import load_cohort
    from mil.config import load_config

    cohort = load_cohort(load_config(overrides).cohort)
    assert len(cohort.bags) == 6 and cohort.dim == 4


def test_predict_from_slides_exits_non_zero_when_a_slide_failed(tmp_path, monkeypatch, caplog):
    """Slides that failed to embed are missing from the predictions: `mil predict` exits 1, naming the summary."""
    import mil.commands.predict as predict_command

    summary = tmp_path / "extract_summary.csv"
    summary.write_text("slide_id,status,n_tiles,reason,path,seconds\n"
                       "a,done,10,,a.svs,1.0\nb,failed,0,SlideError: b.svs: cannot open slide,b.svs,0.1\n")
    outcome: list = [tmp_path, summary]
    monkeypatch.setattr(predict_command, "predict_from_slides", lambda run_dir, overrides: tuple(outcome))
    assert main(["predict", "RUN", "output_dir=x"]) == 1
    last = [r for r in caplog.records if r.levelname == "ERROR"][-1].getMessage()
    assert "1 of 2 slides failed" in last and str(summary) in last
    outcome[1] = None  # predicting from bags: nothing was extracted
    assert main(["predict", "RUN", "output_dir=x"]) == 0
