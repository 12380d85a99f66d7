"""Synthetic cohorts of bags with a planted signal, for tests, benchmarks and tutorials.

Positive patients carry a "signal" direction in a small fraction of their tiles (like a
small tumour region with a biomarker-specific morphology). Every bag also gets a random
shift along that direction over all its tiles, a nuisance (like a staining batch effect)
that swamps the signal in a bag's mean, so attention must find the few tiles that matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mil.bags import write_bag
from mil.io import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class SyntheticCohort:
    clinical_csv: Path
    slide_csv: Path
    features_dir: Path
    positive_tiles: dict[str, np.ndarray]  # slide id -> indices of the planted tiles


def signal_direction(dim: int, seed: int = 12345) -> np.ndarray:
    """The unit vector that marks planted tiles (fixed per dimension, so cohorts share it)."""
    d = np.random.default_rng(seed).standard_normal(dim)
    return d / np.linalg.norm(d)


def make_synthetic_cohort(
    out_dir: str | Path,
    n_patients: int = 60,
    slides_per_patient: tuple[int, int] = (1, 3),
    tiles_per_slide: tuple[int, int] = (40, 80),
    dim: int = 32,
    positive_fraction: float = 0.4,
    signal_fraction: float = 0.05,
    strength: float = 5.0,
    nuisance: float = 0.5,
    seed: int = 0,
    prefix: str = "P",
    classes: tuple[str, str] = ("MSS", "MSI-H"),
    dtype: str = "float16",
) -> SyntheticCohort:
    """Write ``clinical.csv``, ``slides.csv`` and ``features/<slide>.h5`` under ``out_dir``."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    direction = signal_direction(dim)
    n_pos = round(positive_fraction * n_patients)
    labels = np.array([1] * n_pos + [0] * (n_patients - n_pos))
    rng.shuffle(labels)
    clinical, slides, planted = [], [], {}
    for p in range(n_patients):
        pid = f"{prefix}{p:04d}"
        clinical.append({"patient_id": pid, "MSI": classes[labels[p]], "age": int(rng.integers(35, 90))})
        for s in range(int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))):
            sid = f"{pid}-S{s}"
            n = int(rng.integers(tiles_per_slide[0], tiles_per_slide[1] + 1))
            x = rng.standard_normal((n, dim)).astype(np.float32)
            x += rng.normal(0, nuisance) * direction
            if labels[p]:
                k = max(1, round(signal_fraction * n))
                idx = np.sort(rng.choice(n, k, replace=False))
                x[idx] += strength * direction
                planted[sid] = idx
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * 224
            write_bag(
                out / "features" / f"{sid}.h5", x, coords,
                {"encoder": "synthetic", "encoder_weights": "none", "embedding": "planted-signal", "tile_px": 224, "mpp": 0.5},
                dtype=dtype,
            )
            slides.append({"patient_id": pid, "slide_id": sid})
    for name, rows in (("clinical.csv", clinical), ("slides.csv", slides)):
        with atomic_path(out / name) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    logger.info("synthetic cohort: %d patients (%d positive), %d slides in %s", n_patients, n_pos, len(slides), out)
    return SyntheticCohort(out / "clinical.csv", out / "slides.csv", out / "features", planted)
