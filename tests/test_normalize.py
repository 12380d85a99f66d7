"""Feature standardisation uses training-fold statistics only and travels with the weights."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from mil.bags import read_features
from mil.cohort import load_cohort
from mil.config import load_config
from mil.crossval import run_crossval
from mil.splits import load_splits


def test_standardize_fits_on_training_patients_only(tmp_path, cohort_overrides, fast_overrides):
    cfg = load_config([*cohort_overrides, *fast_overrides, "train.standardize=true", "train.max_epochs=1",
                       f"output_dir={tmp_path / 'run'}"])
    out = run_crossval(cfg)
    cohort = load_cohort(cfg.cohort)
    fold = load_splits(out / "splits.yaml", set(cohort.patient_ids.tolist()))[0]
    train = np.concatenate([read_features(p) for b in cohort.subset(set(fold.train)) for p in b.paths]).astype(np.float64)
    every = np.concatenate([read_features(p) for b in cohort.bags for p in b.paths]).astype(np.float64)
    state = load_file(str(out / "fold_0" / "model.safetensors"))
    np.testing.assert_allclose(state["mean"].numpy(), train.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["std"].numpy(), train.std(0), rtol=1e-4)
    assert not np.allclose(state["mean"].numpy(), every.mean(0), atol=1e-4)
    assert torch.isfinite(state["std"]).all()
