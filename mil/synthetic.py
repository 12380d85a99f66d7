"""Synthetic cohorts of bags with a planted signal, for tests, benchmarks and tutorials.

One generator for every task type and for a family of ways to hide the signal, so that a
training recipe can be checked on cohorts that differ in what makes them hard (the recipe
benchmark, ``benchmarks/recipe.py``, runs every family).

How a bag is made. Tile embeddings are drawn around ``tissue_states`` cluster centres (like
the tissue types a foundation model separates: stroma, tumour, mucosa, fat...) plus
isotropic noise; every slide gets its own mixture of states, a random nuisance shift along
the signal directions (a staining batch effect that swamps the signal in a bag's mean) and,
with ``n_sites > 1``, a large shift shared by the slides of one site. Tiles lie on a square
grid of level-0 coordinates (224 px steps). Each patient has latent values in [0, 1], one
per orthogonal signal direction (task kinds below); the ``family`` decides which tiles
carry them:

- ``witness``: a ``signal_fraction`` of a slide's tiles, in one spatial cluster, shifted by
  ``strength`` x latent along the signal direction (a small tumour region).
- ``near_normal``: the witness tiles take a state only ``strength`` noise-sd away from one
  normal tissue state (a subtle morphology close to a common one), instead of a shift.
- ``decoy``: witness tiles, plus ``decoy_fraction`` of salient tiles (``2 x strength`` along
  another direction) in every bag of both classes: attention that locks onto salience fails.
- ``one_slide``: 2 to 4 slides per patient; only one slide of a positive patient has witnesses.
- ``absence``: every negative bag has a ``signal_fraction`` of marker tiles that positive bags
  lack (the label is the absence of a morphology).
- ``dense``: half of the tiles carry a weak shift (``strength`` is small): mean pooling suffices.

Site shifts (``n_sites``, ``site_shift``) and class imbalance (``positive_fraction``) combine
with any family. Task kinds (``kind``) set the labels from the latents:

- ``binary``: label ``classes[1]`` when latent 0 is 1 (a share ``positive_fraction`` of patients).
- ``grade``: 3 classes G1 / G2 / G3; G2 plants direction 0, G3 direction 1.
- ``biomarkers``: binary MSI, BRAF and KRAS (directions 0, 1, 2); a share ``missing`` of the
  BRAF and KRAS labels is left empty.
- ``tmb``: a continuous TMB in [0, 20] proportional to the latent of direction 0.
- ``survival``: the latent z in [0, 1] of direction 0 sets the log-hazard
  (``hazard_range`` x z), exponential event times, uniform censoring (OS_months, OS_event).
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

KINDS = ("binary", "grade", "biomarkers", "tmb", "survival")
FAMILIES = ("witness", "near_normal", "decoy", "one_slide", "absence", "dense")
TILE_PX = 224


@dataclass
class SyntheticCohort:
    clinical_csv: Path
    slide_csv: Path
    features_dir: Path
    positive_tiles: dict[str, np.ndarray]  # slide id -> indices of the tiles that carry the signal


def signal_direction(dim: int, seed: int = 12345) -> np.ndarray:
    """The unit vector [dim] that marks binary planted tiles (fixed per dimension, so cohorts share it)."""
    d = np.random.default_rng(seed).standard_normal(dim)
    return d / np.linalg.norm(d)


def signal_directions(dim: int, n: int, seed: int = 12345) -> np.ndarray:
    """``n`` orthonormal directions [n, dim]; the first is :func:`signal_direction` (fixed per dimension)."""
    first = signal_direction(dim, seed)
    basis = np.random.default_rng(seed + 1).standard_normal((dim, n))
    basis[:, 0] = first
    q = np.linalg.qr(basis)[0].T  # q[0] = +-first, the others orthogonal to it
    q[0] = first
    return q


def _labels(
    kind: str, n: int, rng: np.random.Generator, positive_fraction: float, classes: tuple[str, str],
    target: str, missing: float, hazard_range: float,
) -> tuple[list[dict], np.ndarray]:
    """Clinical rows and latents [n, 3] (signal amplitude per direction, in [0, 1])."""
    latent = np.zeros((n, 3))
    if kind == "binary":
        n_pos = round(positive_fraction * n)
        positive = rng.permutation(np.arange(n) < n_pos)
        latent[:, 0] = positive
        return [{target: classes[int(p)]} for p in positive], latent
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


def _cluster(coords: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``k`` tiles nearest a random tile: one spatially contiguous region."""
    centre = coords[rng.integers(len(coords))]
    return np.sort(np.argsort(((coords - centre) ** 2).sum(1), kind="stable")[:k])


def make_synthetic_cohort(
    out_dir: str | Path,
    n_patients: int = 60,
    *,
    kind: str = "binary",
    family: str = "witness",
    slides_per_patient: tuple[int, int] = (1, 3),
    tiles_per_slide: tuple[int, int] = (40, 80),
    dim: int = 32,
    positive_fraction: float = 0.4,
    signal_fraction: float = 0.05,
    strength: float = 5.0,
    nuisance: float = 0.5,
    tissue_states: int = 0,
    state_scale: float = 3.0,
    decoy_fraction: float = 0.05,
    n_sites: int = 1,
    site_shift: float = 3.0,
    missing: float = 0.0,
    hazard_range: float = 8.0,
    seed: int = 0,
    prefix: str = "P",
    classes: tuple[str, str] = ("MSS", "MSI-H"),
    target: str = "MSI",
    dtype: str = "float16",
) -> SyntheticCohort:
    """Write ``clinical.csv``, ``slides.csv`` and ``features/<slide>.h5`` under ``out_dir``.

    Features are [n_tiles, ``dim``] with unit-variance noise; ``strength``, ``state_scale`` and
    ``site_shift`` are in units of that noise's standard deviation. ``tissue_states=0`` gives
    isotropic tiles (no tissue structure). ``clinical.csv`` has ``patient_id``, the label
    columns of ``kind``, ``age`` and ``site``; ``slides.csv`` has ``patient_id``, ``slide_id``.
    Raises ``ValueError`` for an unknown ``kind`` or ``family``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    directions = signal_directions(dim, 4)  # 0-2: signal per latent; 3: decoys
    rows, latent = _labels(kind, n_patients, rng, positive_fraction, classes, target, missing, hazard_range)
    geometry = np.random.default_rng(seed + 10_000)  # tissue and sites: the same for every kind
    # Centres with norm ~ state_scale (site_shift): that many noise sd apart along their direction.
    states = geometry.standard_normal((max(tissue_states, 1), dim)) * state_scale / np.sqrt(dim)
    if tissue_states == 0:
        states[:] = 0.0
    sites = geometry.standard_normal((n_sites, dim)) * site_shift / np.sqrt(dim) if n_sites > 1 else np.zeros((1, dim))
    per_slide = (2, 4) if family == "one_slide" else slides_per_patient
    clinical, slides, planted = [], [], {}
    for p, row in enumerate(rows):
        pid = f"{prefix}{p:04d}"
        site = int(rng.integers(n_sites))
        clinical.append({"patient_id": pid, **row, "age": int(rng.integers(35, 90)), "site": f"S{site}"})
        n_slides = int(rng.integers(per_slide[0], per_slide[1] + 1))
        signal_slide = int(rng.integers(n_slides))
        for s in range(n_slides):
            sid = f"{pid}-S{s}"
            n = int(rng.integers(tiles_per_slide[0], tiles_per_slide[1] + 1))
            side = int(np.ceil(np.sqrt(n)))
            grid = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1)
            mix = rng.dirichlet(np.ones(len(states)))
            state_of = rng.choice(len(states), n, p=mix)
            x = rng.standard_normal((n, dim)) + states[state_of] + sites[site]
            x += rng.normal(0, nuisance, 3) @ directions[:3]
            k = max(1, round(signal_fraction * n))
            carries = latent[p].any() and (family != "one_slide" or s == signal_slide)
            idx = _cluster(grid, k, rng)
            if family == "absence":
                if not latent[p, 0]:
                    x[idx] += strength * directions[0]
                else:
                    idx = idx[:0]
            elif family == "near_normal":
                if carries:
                    x[idx] = rng.standard_normal((k, dim)) + states[0] + sites[site] + strength * (latent[p] @ directions[:3])
            elif family == "dense":
                idx = np.sort(rng.choice(n, max(1, n // 2), replace=False))
                if carries:
                    x[idx] += strength * (latent[p] @ directions[:3])
            elif carries:
                x[idx] += strength * (latent[p] @ directions[:3])
            if family == "decoy":
                decoys = rng.choice(n, max(1, round(decoy_fraction * n)), replace=False)
                x[decoys] += 2 * strength * directions[3]
            if carries or (family == "absence" and len(idx)):
                planted[sid] = idx
            write_bag(
                out / "features" / f"{sid}.h5", x.astype(np.float32), grid * TILE_PX,
                {"encoder": "synthetic", "encoder_weights": "none", "embedding": f"planted-{kind}-{family}",
                 "tile_px": TILE_PX, "mpp": 0.5},
                dtype=dtype,
            )
            slides.append({"patient_id": pid, "slide_id": sid})
    for name, table in (("clinical.csv", clinical), ("slides.csv", slides)):
        with atomic_path(out / name) as tmp:
            pd.DataFrame(table).to_csv(tmp, index=False)
    logger.info("synthetic %s/%s cohort: %d patients, %d slides in %s", kind, family, n_patients, len(slides), out)
    return SyntheticCohort(out / "clinical.csv", out / "slides.csv", out / "features", planted)
