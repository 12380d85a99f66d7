"""Tiling at an exact resolution: every tile covers ``tile_px * mpp`` microns, whatever the scanner.

Tiles are placed on a grid in level-0 pixels with a (generally fractional) step of
``tile_px * target_mpp / slide_mpp``; each is read from the coarsest pyramid level that is
at least as fine as the target and resized to ``tile_px`` with a fractional source box, so
no rounding to magnification buckets or whole levels changes the physical tile size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from encoders.slides import read_region

LEVEL_TOLERANCE = 0.01  # a level up to 1% coarser than the target still counts as "at or finer"


@dataclass(frozen=True)
class TilePlan:
    """How tiles of one slide are read."""

    target_mpp: float
    tile_px: int
    slide_mpp: float
    tile_size_level0: float  # tile side in level-0 pixels (fractional)
    level: int
    level_downsample: float

    @property
    def read_size(self) -> float:
        """Tile side in pixels of the level read."""
        return self.tile_size_level0 / self.level_downsample


def plan_tiles(slide_mpp: float, target_mpp: float, tile_px: int, level_downsamples: Sequence[float]) -> TilePlan:
    """Pick the level to read: the coarsest one at or finer than ``target_mpp`` (level 0 if none)."""
    if not (slide_mpp > 0 and target_mpp > 0 and tile_px > 0):
        raise ValueError(f"mpp and tile size must be positive (slide {slide_mpp}, target {target_mpp}, {tile_px} px)")
    eligible = [i for i, ds in enumerate(level_downsamples) if slide_mpp * ds <= target_mpp * (1 + LEVEL_TOLERANCE)]
    level = max(eligible, key=lambda i: level_downsamples[i]) if eligible else 0
    return TilePlan(
        target_mpp=float(target_mpp),
        tile_px=int(tile_px),
        slide_mpp=float(slide_mpp),
        tile_size_level0=tile_px * target_mpp / slide_mpp,
        level=level,
        level_downsample=float(level_downsamples[level]),
    )


def grid_coords(width: int, height: int, tile_size_level0: float) -> np.ndarray:
    """Top-left level-0 corners ``[N, 2]`` (x, y) of whole tiles, row-major."""
    nx, ny = int(width // tile_size_level0), int(height // tile_size_level0)
    xs = np.round(np.arange(nx) * tile_size_level0).astype(np.int64)
    ys = np.round(np.arange(ny) * tile_size_level0).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fraction(coords: np.ndarray, tile_size_level0: float, mask: np.ndarray,
                    dimensions: tuple[int, int]) -> np.ndarray:
    """Fraction of each tile's area that the (thumbnail-scale) mask marks as tissue."""
    if len(coords) == 0:
        return np.zeros(0)
    h, w = mask.shape
    sx, sy = w / dimensions[0], h / dimensions[1]
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(coords[:, 0] * sx).astype(int), 0, w - 1)
    y0 = np.clip(np.round(coords[:, 1] * sy).astype(int), 0, h - 1)
    x1 = np.clip(np.round((coords[:, 0] + tile_size_level0) * sx).astype(int), x0 + 1, w)
    y1 = np.clip(np.round((coords[:, 1] + tile_size_level0) * sy).astype(int), y0 + 1, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def read_tile(slide: openslide.OpenSlide, path: Path, x: int, y: int, plan: TilePlan) -> Image.Image:
    """The ``tile_px`` RGB tile whose top-left level-0 corner is (x, y)."""
    size = plan.read_size
    n = math.ceil(size - 1e-6)
    region = read_region(slide, path, (int(x), int(y)), plan.level, (n, n))
    if n == plan.tile_px and abs(size - n) < 1e-6:
        return region
    return region.resize((plan.tile_px, plan.tile_px), Image.Resampling.BICUBIC, box=(0.0, 0.0, size, size))
