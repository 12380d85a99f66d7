"""Shared fixtures. Sections: core (synthetic bag cohorts) first; slide fixtures below."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models: one thread is fastest and avoids OpenMP oversubscription on small CI machines.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------- core: synthetic bag cohorts
@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """A 30-patient cohort of small bags with a planted signal (shared, read-only)."""
    from mil.synthetic import make_synthetic_cohort

    return make_synthetic_cohort(
        tmp_path_factory.mktemp("cohort"), n_patients=30, tiles_per_slide=(12, 30), dim=16, seed=3
    )


@pytest.fixture(scope="session")
def make_task_cohort():
    """``make_task_cohort(out, kind, n, **options)``: a small cohort of any task kind, strong signal, 8-d."""
    from mil.synthetic import make_synthetic_cohort

    def make(out, kind: str, n: int, **options):
        settings = {"slides_per_patient": (1, 2), "tiles_per_slide": (20, 40), "dim": 8, "signal_fraction": 0.2,
                    "strength": 6.0, **options}
        return make_synthetic_cohort(out, n, kind=kind, **settings)

    return make


@pytest.fixture
def fast_overrides():
    """Config overrides that keep a cross-validation to a few seconds."""
    return [
        "model.args={hidden_dim: 32}",
        "cv.folds=3",
        "cv.bootstrap=50",
        "train.max_epochs=4",
        "train.min_steps=0",  # the epoch count alone: tests stay fast
        "train.refit=false",  # one training run per fold (tests of the refit set it)
        "cv.inner_folds=0",  # one validation split (tests of the inner folds set them)
        "train.warmup_steps=0",
        "train.min_epochs=1",
        "train.batch_size=4",
        "train.bag_size=16",
        "train.lr=3e-3",
        "train.precision=32-true",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.logger=none",
    ]


@pytest.fixture
def cohort_overrides(synthetic_cohort):
    c = synthetic_cohort
    return [
        f"cohort.clinical_csv={c.clinical_csv}",
        f"cohort.slide_csv={c.slide_csv}",
        f"cohort.features_dir={c.features_dir}",
        "cohort.target=MSI",
        "cohort.classes=[MSS,MSI-H]",
    ]


# ---------------------------------------------------------------- slides: synthetic pyramidal TIFFs
# Used by test_slides.py and test_extract.py (encoders/). Slides are tiled pyramidal TIFFs written
# with tifffile, which OpenSlide reads as "generic-tiff"; mpp goes into the resolution tags.
BACKGROUND_RGB = (240, 238, 242)
TISSUE_RGB = (222, 140, 186)  # eosin-pink
NUCLEUS_RGB = (110, 60, 150)  # haematoxylin-purple


class SyntheticSlide:
    """A slide written by ``make_slide``: its path and the geometry of its tissue."""

    def __init__(self, path: Path, width: int, height: int, mpp: float | None, ellipse) -> None:
        self.path, self.width, self.height, self.mpp = path, width, height, mpp
        self.ellipse = ellipse  # (cx, cy, rx, ry) in level-0 px, or None (no tissue / stripes)

    def inside(self, x, y):
        """Whether level-0 points lie in the tissue ellipse."""
        cx, cy, rx, ry = self.ellipse
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def synthetic_he(width: int, height: int, mpp: float, tissue: str, seed: int):
    """RGB uint8 image: noisy background plus an ellipse of textured 'tissue' or stripes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND_RGB
    img += rng.integers(0, 4, size=img.shape, dtype=np.uint8)
    yy, xx = np.ogrid[0:height, 0:width]
    ellipse = None
    if tissue == "ellipse":
        ellipse = (width * 0.5, height * 0.5, width * 0.3, height * 0.32)
        cx, cy, rx, ry = ellipse
        region = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    elif tissue == "stripes":  # 20 µm pink / 20 µm white stripes, whatever the mpp
        region = np.broadcast_to((np.floor(xx * mpp / 20.0) % 2 == 0), (height, width))
    else:
        region = np.zeros((height, width), bool)
    img[region] = TISSUE_RGB
    nuclei = region & (rng.random((height, width)) < 0.03)
    img[nuclei] = NUCLEUS_RGB
    return img, ellipse


def write_pyramid_tiff(path: Path, rgb, mpp: float | None, levels: int = 3, tile: int = 256) -> Path:
    """A tiled pyramid (downsample 2 per level) that OpenSlide opens as generic-tiff."""
    import numpy as np
    import tifffile
    from PIL import Image

    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            extra = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**level)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(np.asarray(img), tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=0 if level == 0 else 1, **extra)
            if min(img.size) < 2 * tile:
                break
            img = img.reduce(2)
    return path


@pytest.fixture
def make_slide(tmp_path):
    """``make_slide(name, size=(1024, 768), mpp=0.5, tissue="ellipse"|"stripes"|"none")``."""

    def make(name: str = "slide", size=(1024, 768), mpp: float | None = 0.5, tissue: str = "ellipse",
             levels: int = 3, seed: int = 0, folder: Path | None = None) -> SyntheticSlide:
        folder = folder or tmp_path / "slides"
        folder.mkdir(parents=True, exist_ok=True)
        rgb, ellipse = synthetic_he(size[0], size[1], mpp or 0.5, tissue, seed)
        path = write_pyramid_tiff(folder / f"{name}.tiff", rgb, mpp, levels)
        return SyntheticSlide(path, size[0], size[1], mpp, ellipse)

    return make


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """The real slide files in ../shared/data/slides (skips the test when absent)."""
    folder = SHARED_DATA / "slides"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return folder
