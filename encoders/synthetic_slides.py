"""Synthetic H&E-like whole-slide images in a real slide format, with known planted regions.

Each slide is a tiled, pyramidal TIFF (written with tifffile, resolution tags in pixels per
centimetre) that OpenSlide opens as ``generic-tiff`` with ``openslide.mpp-x/y`` set, so the
whole pipeline (tissue detection, exact-mpp tiling, encoders, heatmaps) runs on it unchanged.

What a slide shows, with sizes in microns so they do not depend on the pixel size:

* white, slightly noisy glass;
* one or two tissue pieces with irregular outlines: pink, fibrous stroma with sparse small
  purple nuclei (lymphocytes, fibroblasts);
* optionally planted *tumour-like* regions (rotated ellipses, returned exactly): lilac
  background crowded with large, dark-purple nuclei. They are visibly and texturally
  different, and are the ground truth for attention-heatmap tests.

:func:`make_slide_cohort` writes a labelled cohort (``slides.csv``, ``clinical.csv``,
``ground_truth.json``) in which every slide of a positive patient carries planted regions.
Everything is determined by the seed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from encoders.synthetic_he import Ellipse, render_he
from mil.io import atomic_path, write_json

logger = logging.getLogger(__name__)

PYRAMID_TILE = 256  # TIFF tile side

__all__ = [
    "Ellipse", "SlideCohort", "SyntheticSlide", "load_ground_truth", "make_slide_cohort", "render_he",
    "write_pyramid_tiff", "write_slide",
]


@dataclass(frozen=True)
class SyntheticSlide:
    """A written slide and its ground truth (all geometry in level-0 pixels)."""

    slide_id: str
    path: Path
    width: int
    height: int
    mpp: float
    tumour: tuple[Ellipse, ...]  # planted regions, exact
    tissue: tuple[Ellipse, ...]  # the tissue pieces before their outline was roughened

    def in_tumour(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether level-0 points lie in a planted region."""
        inside = np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape, bool)
        for e in self.tumour:
            inside |= e.contains(x, y)
        return inside

    def tumour_fraction(self, coords: np.ndarray, tile_size_level0: float, samples: int = 8) -> np.ndarray:
        """Fraction of each tile (top-left ``coords`` [N, 2]) inside a planted region."""
        offsets = (np.arange(samples) + 0.5) / samples * tile_size_level0
        ox, oy = np.meshgrid(offsets, offsets)
        coords = np.asarray(coords, float)
        x = coords[:, :1] + ox.ravel()[None]
        y = coords[:, 1:2] + oy.ravel()[None]
        return self.in_tumour(x, y).mean(axis=1)

    def to_dict(self) -> dict:
        return {
            "slide_id": self.slide_id, "path": str(self.path), "width": self.width, "height": self.height,
            "mpp": self.mpp, "tumour": [asdict(e) for e in self.tumour], "tissue": [asdict(e) for e in self.tissue],
        }

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> SyntheticSlide:
        path = Path(d["path"])
        return cls(
            d["slide_id"], path if path.is_absolute() or base is None else base / path, int(d["width"]),
            int(d["height"]), float(d["mpp"]), tuple(Ellipse(**e) for e in d["tumour"]),
            tuple(Ellipse(**e) for e in d["tissue"]),
        )


@dataclass(frozen=True)
class SlideCohort:
    """What :func:`make_slide_cohort` wrote."""

    root: Path
    slides_dir: Path
    slide_csv: Path  # patient_id, slide_id, path (relative to the CSV)
    clinical_csv: Path  # patient_id, MSI
    ground_truth: Path  # JSON: slide id -> SyntheticSlide.to_dict()
    slides: dict[str, SyntheticSlide]
    labels: dict[str, str]  # patient id -> class


CODECS = {"jpeg": ("jpeg", {"level": 90}), "zlib": ("zlib", {"level": 1}), "none": ("none", None)}


def _codec(compression: str) -> tuple[str, dict | None]:
    if compression == "auto":
        try:
            import imagecodecs  # noqa: F401  (tifffile's JPEG codec)
        except ImportError:
            compression = "zlib"
        else:
            compression = "jpeg"
    if compression not in CODECS:
        raise ValueError(f"compression={compression!r}; expected 'auto' or one of {sorted(CODECS)}")
    return CODECS[compression]


def write_pyramid_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float | None,
                       compression: str = "auto", tile: int = PYRAMID_TILE) -> Path:
    """Write ``rgb`` as a tiled pyramid (downsample 2 per level) that OpenSlide opens as generic-tiff.

    ``mpp`` goes into the resolution tags (pixels per centimetre); ``None`` writes none.
    ``compression``: ``"jpeg"`` (small, lossy; needs imagecodecs), ``"zlib"`` (lossless),
    ``"none"``, or ``"auto"`` (JPEG when imagecodecs is installed, else zlib). Written to a
    temporary name and renamed when complete.
    """
    import tifffile

    codec, args = _codec(compression)
    img = Image.fromarray(np.ascontiguousarray(rgb))
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        level = 0
        while True:
            extra = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**level)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(np.asarray(img), tile=(tile, tile), photometric="rgb", compression=codec,
                     compressionargs=args, subfiletype=0 if level == 0 else 1, **extra)
            if min(img.size) < 2 * tile:
                break
            img, level = img.reduce(2), level + 1
    return path


def write_slide(path: str | os.PathLike, width: int = 3072, height: int = 2304, mpp: float = 0.5, seed: int = 0,
                n_tumour: int = 0, slide_id: str | None = None, compression: str = "auto") -> SyntheticSlide:
    """Render and write one slide; returns it with its ground truth."""
    rgb, tumours, pieces = render_he(width, height, mpp, seed, n_tumour)
    path = write_pyramid_tiff(path, rgb, mpp, compression)
    return SyntheticSlide(slide_id or path.stem, path, width, height, mpp, tumours, pieces)


def load_ground_truth(path: str | os.PathLike) -> dict[str, SyntheticSlide]:
    """Read a cohort's ``ground_truth.json`` (slide paths relative to its folder)."""
    import json

    path = Path(path)
    data = json.loads(path.read_text())
    return {sid: SyntheticSlide.from_dict(d, path.parent) for sid, d in data.items()}


def make_slide_cohort(
    out_dir: str | os.PathLike,
    n_patients: int = 40,
    slides_per_patient: tuple[int, int] = (1, 2),
    positive_fraction: float = 0.4,
    seed: int = 0,
    size: tuple[int, int] = (3072, 2304),
    mpp: float = 0.5,
    tumour_regions: tuple[int, int] = (1, 2),
    size_jitter: float = 0.15,
    prefix: str = "P",
    classes: tuple[str, str] = ("MSS", "MSI-H"),
    target: str = "MSI",
    compression: str = "auto",
) -> SlideCohort:
    """Write a labelled cohort of synthetic slides under ``out_dir``.

    ``out_dir/slides/<slide_id>.tiff``; ``slides.csv`` (patient_id, slide_id, path relative to
    the CSV); ``clinical.csv`` (patient_id, ``target`` with ``classes[0]`` negative and
    ``classes[1]`` positive); ``ground_truth.json`` (every slide's size, mpp and planted
    ellipses). Every slide of a positive patient carries ``tumour_regions`` (inclusive range)
    planted regions, negative patients' slides none. Slide sizes vary by ``±size_jitter``
    around ``size`` (width, height), so they are generally not multiples of a tile size.
    """
    if not 0 <= positive_fraction <= 1:
        raise ValueError(f"positive_fraction={positive_fraction} must lie in [0, 1]")
    if n_patients < 1 or slides_per_patient[0] < 1 or slides_per_patient[1] < slides_per_patient[0]:
        raise ValueError(f"need n_patients >= 1 and slides_per_patient (min, max) with 1 <= min <= max, got "
                         f"n_patients={n_patients}, slides_per_patient={slides_per_patient}")
    _codec(compression)  # fail before writing anything
    root = Path(out_dir)
    slides_dir = root / "slides"
    rng = np.random.default_rng(seed)
    n_pos = round(positive_fraction * n_patients)
    positive = np.array([True] * n_pos + [False] * (n_patients - n_pos))
    rng.shuffle(positive)
    slides: dict[str, SyntheticSlide] = {}
    labels: dict[str, str] = {}
    rows = []
    for p in range(n_patients):
        pid = f"{prefix}{p:04d}"
        labels[pid] = classes[int(positive[p])]
        for s in range(int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))):
            sid = f"{pid}-S{s}"
            w, h = (round(d * rng.uniform(1 - size_jitter, 1 + size_jitter)) for d in size)
            n_tumour = int(rng.integers(tumour_regions[0], tumour_regions[1] + 1)) if positive[p] else 0
            slide_seed = int(rng.integers(2**31))
            slides[sid] = write_slide(slides_dir / f"{sid}.tiff", w, h, mpp, slide_seed, n_tumour, sid, compression)
            rows.append({"patient_id": pid, "slide_id": sid, "path": f"slides/{sid}.tiff"})
        logger.debug("patient %s (%s): slides written", pid, labels[pid])
    slide_csv, clinical_csv, truth = root / "slides.csv", root / "clinical.csv", root / "ground_truth.json"
    with atomic_path(slide_csv) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(clinical_csv) as tmp:
        pd.DataFrame({"patient_id": list(labels), target: list(labels.values())}).to_csv(tmp, index=False)
    write_json(truth, {sid: {**s.to_dict(), "path": os.path.relpath(s.path, root)} for sid, s in slides.items()})
    logger.info("wrote %d slides of %d patients (%d positive) to %s", len(slides), n_patients, n_pos, root)
    return SlideCohort(root, slides_dir, slide_csv, clinical_csv, truth, slides, labels)
