"""Synthetic cohorts with a planted signal for every task type (tests, examples, benchmarks).

Each patient has latent values, one per orthogonal "signal direction"; a fraction of the
tiles of each slide is shifted along direction k by ``strength`` x latent k (a small region
whose morphology carries the biomarker), and every bag gets a random nuisance shift along
all directions. Labels derive from the latents:

- ``grade``: 3 classes G1 / G2 / G3; G2 plants direction 0, G3 direction 1.
- ``biomarkers``: binary MSI, BRAF and KRAS (directions 0, 1, 2); ``missing`` of the BRAF
  and KRAS labels are left empty.
- ``tmb``: a continuous TMB in [0, 20] proportional to the latent of direction 0.
- ``survival``: the latent z in [0, 1] of direction 0 sets the log-hazard (``hazard_range``
  x z), exponential event times, uniform censoring; columns OS_months and OS_event.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mil.bags import write_bag
from mil.io import atomic_path
from mil.synthetic import SyntheticCohort

logger = logging.getLogger(__name__)

KINDS = ("grade", "biomarkers", "tmb", "survival")


def signal_directions(dim: int, n: int, seed: int = 2024) -> np.ndarray:
    """``n`` orthonormal directions [n, dim] (fixed per dimension, so cohorts share them)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, n)))
    return q.T


def _labels(kind: str, n: int, rng: np.random.Generator, missing: float, hazard_range: float) -> tuple[list[dict], np.ndarray]:
    """Clinical rows and latents [n, 3] (signal amplitude per direction, in [0, 1])."""
    latent = np.zeros((n, 3))
    if kind == "grade":
        grade = rng.permutation(np.arange(n) % 3)
        latent[grade == 1, 0] = latent[grade == 2, 1] = 1.0
        return [{"grade": f"G{g + 1}"} for g in grade], latent
    if kind == "biomarkers":
        status = rng.random((n, 3)) < np.array([0.4, 0.35, 0.45])
        latent[:] = status
        rows = []
        for s in status:
            row = {name: ("mutant" if s[k] else "wild-type") for k, name in ((1, "BRAF"), (2, "KRAS"))}
            rows.append({"MSI": "MSI-H" if s[0] else "MSS",
                         **{k: (None if rng.random() < missing else v) for k, v in row.items()}})
        return rows, latent
    z = rng.random(n)
    latent[:, 0] = z
    if kind == "tmb":
        return [{"TMB": round(20 * v, 2)} for v in z], latent
    if kind == "survival":
        rate = 0.05 * np.exp(hazard_range * (z - 0.5))
        event_time = rng.exponential(1 / rate)
        censor_time = rng.uniform(0, np.quantile(event_time, 0.9) * 1.5, n)
        time = np.minimum(event_time, censor_time)
        return [{"OS_months": round(float(t), 2), "OS_event": int(e)}
                for t, e in zip(time, event_time <= censor_time, strict=True)], latent
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def make_task_cohort(
    out_dir: str | Path,
    kind: str,
    n_patients: int = 60,
    slides_per_patient: tuple[int, int] = (1, 2),
    tiles_per_slide: tuple[int, int] = (20, 40),
    dim: int = 8,
    signal_fraction: float = 0.2,
    strength: float = 6.0,
    nuisance: float = 0.5,
    missing: float = 0.0,
    hazard_range: float = 8.0,
    seed: int = 0,
    prefix: str = "P",
) -> SyntheticCohort:
    """Write ``clinical.csv``, ``slides.csv`` and ``features/<slide>.h5`` under ``out_dir``."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    directions = signal_directions(dim, 3)
    rows, latent = _labels(kind, n_patients, rng, missing, hazard_range)
    clinical, slides, planted = [], [], {}
    for p, row in enumerate(rows):
        pid = f"{prefix}{p:04d}"
        clinical.append({"patient_id": pid, **row})
        for s in range(int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))):
            sid = f"{pid}-S{s}"
            n = int(rng.integers(tiles_per_slide[0], tiles_per_slide[1] + 1))
            x = rng.standard_normal((n, dim)) + rng.normal(0, nuisance, 3) @ directions
            idx = np.sort(rng.choice(n, max(1, round(signal_fraction * n)), replace=False))
            x[idx] += strength * latent[p] @ directions
            if latent[p].any():
                planted[sid] = idx
            write_bag(out / "features" / f"{sid}.h5", x.astype(np.float32), None,
                      {"encoder": "synthetic", "encoder_weights": "none", "embedding": f"planted-{kind}"})
            slides.append({"patient_id": pid, "slide_id": sid})
    for name, table in (("clinical.csv", clinical), ("slides.csv", slides)):
        with atomic_path(out / name) as tmp:
            pd.DataFrame(table).to_csv(tmp, index=False)
    logger.info("synthetic %s cohort: %d patients, %d slides in %s", kind, n_patients, len(slides), out)
    return SyntheticCohort(out / "clinical.csv", out / "slides.csv", out / "features", planted)
