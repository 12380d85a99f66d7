"""Slide, clinical covariates or both: `mil crossval ... cv.ablation=true` on synthetic cohorts.

    python benchmarks/covariate_ablation.py --out /tmp/covariate-bench --scenario both
    python benchmarks/covariate_ablation.py --out /tmp/covariate-bench --scenario null

Bags come from :func:`mil.synthetic.make_synthetic_cohort` (half the patients carry the planted
tile signal ``s``). A clinical table adds ``age`` and ``size_mm`` (numeric, 10% of ``size_mm``
missing) and ``stage`` (I-III) and ``site`` (categorical), and a binary outcome ``response``:

- ``both``: ``logit P(response) = 2 (2 s - 1) + 1.5 c`` with the clinical score
  ``c = z(age) + 0.8 (stage - II)``: the slide and the covariates each carry part of the signal;
- ``null``: ``response = s``; the covariates are independent noise.

Prints the ablation table of the run's ``summary.md`` (pooled out-of-fold AUROC of slide-only,
covariates-only and fused models, and the paired patient bootstrap of the differences).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mil.config import load_config
from mil.crossval import run_crossval
from mil.synthetic import make_synthetic_cohort


def write_clinical(clinical_csv: Path, scenario: str, seed: int) -> Path:
    """Add covariates and the ``response`` outcome to the synthetic clinical table; returns the new CSV."""
    df = pd.read_csv(clinical_csv)
    rng = np.random.default_rng([seed, 17])  # not the cohort's own stream: covariates independent of the bags
    n = len(df)
    s = (df["MSI"] == "MSI-H").to_numpy(float)
    df["age"] = rng.normal(65, 10, n).round(0)
    df["size_mm"] = rng.uniform(5, 80, n).round(1)
    df.loc[rng.random(n) < 0.1, "size_mm"] = np.nan
    stage = rng.integers(0, 3, n)
    df["stage"] = np.array(["I", "II", "III"])[stage]
    df["site"] = rng.choice(["colon", "rectum"], n)
    if scenario == "both":
        clinical = (df["age"] - 65) / 10 + 0.8 * (stage - 1)
        logit = 2.0 * (2 * s - 1) + 1.5 * clinical
        y = rng.random(n) < 1 / (1 + np.exp(-logit))
    else:
        y = s.astype(bool)
    df["response"] = np.where(y, "responder", "non-responder")
    out = clinical_csv.with_name(f"clinical_{scenario}.csv")
    df.to_csv(out, index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/covariate-bench"))
    parser.add_argument("--scenario", choices=["both", "null"], default="both")
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--model", default="gated_abmil")
    parser.add_argument("--fusion", default="late", choices=["late", "film"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cohort = make_synthetic_cohort(args.out / "cohort", n_patients=args.patients, tiles_per_slide=(20, 40),
                                   positive_fraction=0.5, seed=args.seed)
    clinical = write_clinical(cohort.clinical_csv, args.scenario, args.seed)
    cfg = load_config([
        f"cohort.clinical_csv={clinical}", f"cohort.slide_csv={cohort.slide_csv}",
        f"cohort.features_dir={cohort.features_dir}", "cohort.target=response", "cohort.classes=[non-responder,responder]",
        "cohort.covariates.numeric=[age,size_mm]", "cohort.covariates.categorical=[stage,site]",
        f"model.name={args.model}", "model.args={hidden_dim: 64}", f"model.fusion={args.fusion}",
        "cv.folds=5", "cv.ablation=true", "cv.bootstrap=1000",
        "train.precision=32-true",  # otherwise the default recipe
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "trainer.logger=none",
        f"output_dir={args.out / f'{args.scenario}-{args.model}-{args.fusion}'}",
    ])
    out = run_crossval(cfg)
    result = json.loads((out / "metrics.json").read_text())["ablation"]
    summary = (out / "summary.md").read_text()
    print(summary[summary.index("## Ablation"):])
    print(json.dumps(result["differences"], indent=2))


if __name__ == "__main__":
    main()
