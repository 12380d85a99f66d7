"""Tiling at an exact resolution: every tile covers ``tile_px * mpp`` microns, whatever the scanner.

Tiles are placed on a grid in level-0 pixels with a (generally fractional) step of
``tile_px * target_mpp / slide_mpp``; each is read from the coarsest pyramid level that is
at least as fine as the target and resized to ``tile_px`` with a fractional source box, so
no rounding to magnification buckets or whole levels changes the physical tile size.

Slides with non-square pixels (mpp-x != mpp-y) get separate x and y steps: each tile is a
rectangular level-0 box covering ``tile_px * target_mpp`` µm in both directions, resized to a
square ``tile_px`` image.
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
    slide_mpp: float  # level-0 µm per pixel in x
    tile_size_level0: float  # tile width in level-0 pixels (fractional)
    level: int
    level_downsample: float
    slide_mpp_y: float | None = None  # level-0 µm per pixel in y when pixels are not square

    @property
    def square(self) -> bool:
        return self.slide_mpp_y is None or self.slide_mpp_y == self.slide_mpp

    @property
    def tile_size_level0_y(self) -> float:
        """Tile height in level-0 pixels (the width unless pixels are non-square)."""
        return self.tile_size_level0 if self.square else self.tile_px * self.target_mpp / self.slide_mpp_y

    @property
    def read_size(self) -> float:
        """Tile width in pixels of the level read."""
        return self.tile_size_level0 / self.level_downsample

    @property
    def read_size_y(self) -> float:
        """Tile height in pixels of the level read."""
        return self.tile_size_level0_y / self.level_downsample

    def geometry_attrs(self) -> dict[str, float]:
        """The true tile geometry for a bag: one size for square pixels, x and y sizes otherwise."""
        if self.square:
            return {"tile_size_level0": self.tile_size_level0, "slide_mpp": self.slide_mpp}
        return {"tile_size_level0_x": self.tile_size_level0, "tile_size_level0_y": self.tile_size_level0_y,
                "slide_mpp_x": self.slide_mpp, "slide_mpp_y": float(self.slide_mpp_y)}


def plan_tiles(slide_mpp: float, target_mpp: float, tile_px: int, level_downsamples: Sequence[float],
               slide_mpp_y: float | None = None) -> TilePlan:
    """Pick the level to read: the coarsest one at or finer than ``target_mpp`` (level 0 if none).

    ``slide_mpp`` is the level-0 resolution in x; ``slide_mpp_y`` the one in y for non-square
    pixels (the level must then be fine enough in the coarser direction).
    """
    coarser = max(slide_mpp, slide_mpp_y or slide_mpp)
    if not (slide_mpp > 0 and (slide_mpp_y is None or slide_mpp_y > 0) and target_mpp > 0 and tile_px > 0):
        raise ValueError(f"mpp and tile size must be positive (slide {slide_mpp}, target {target_mpp}, {tile_px} px)")
    eligible = [i for i, ds in enumerate(level_downsamples) if coarser * ds <= target_mpp * (1 + LEVEL_TOLERANCE)]
    level = max(eligible, key=lambda i: level_downsamples[i]) if eligible else 0
    return TilePlan(
        target_mpp=float(target_mpp),
        tile_px=int(tile_px),
        slide_mpp=float(slide_mpp),
        tile_size_level0=tile_px * target_mpp / slide_mpp,
        level=level,
        level_downsample=float(level_downsamples[level]),
        slide_mpp_y=None if slide_mpp_y is None or slide_mpp_y == slide_mpp else float(slide_mpp_y),
    )


def grid_coords(width: int, height: int, tile_size_level0: float, tile_size_level0_y: float | None = None) -> np.ndarray:
    """Top-left level-0 corners ``[N, 2]`` (x, y) of whole tiles, row-major (height: ``tile_size_level0_y``)."""
    step_y = tile_size_level0 if tile_size_level0_y is None else tile_size_level0_y
    nx, ny = int(width // tile_size_level0), int(height // step_y)
    xs = np.round(np.arange(nx) * tile_size_level0).astype(np.int64)
    ys = np.round(np.arange(ny) * step_y).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fraction(coords: np.ndarray, tile_size_level0: float, mask: np.ndarray,
                    dimensions: tuple[int, int], tile_size_level0_y: float | None = None) -> np.ndarray:
    """Fraction of each tile's area that the (thumbnail-scale) mask marks as tissue."""
    size_y = tile_size_level0 if tile_size_level0_y is None else tile_size_level0_y
    if len(coords) == 0:
        return np.zeros(0)
    h, w = mask.shape
    sx, sy = w / dimensions[0], h / dimensions[1]
    # int32 holds any thumbnail's pixel count; in-place sums avoid two full-size temporaries
    integral = np.zeros((h + 1, w + 1), np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    x0 = np.clip(np.round(coords[:, 0] * sx).astype(int), 0, w - 1)
    y0 = np.clip(np.round(coords[:, 1] * sy).astype(int), 0, h - 1)
    x1 = np.clip(np.round((coords[:, 0] + tile_size_level0) * sx).astype(int), x0 + 1, w)
    y1 = np.clip(np.round((coords[:, 1] + size_y) * sy).astype(int), y0 + 1, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def read_tile(slide: openslide.OpenSlide, path: Path, x: int, y: int, plan: TilePlan) -> Image.Image:
    """The square ``tile_px`` RGB tile whose top-left level-0 corner is (x, y).

    The level-0 box is ``tile_size_level0 x tile_size_level0_y`` (rectangular for non-square
    pixels), so the tile covers ``tile_px * target_mpp`` µm in both directions.
    """
    w, h = plan.read_size, plan.read_size_y
    nw, nh = math.ceil(w - 1e-6), math.ceil(h - 1e-6)
    region = read_region(slide, path, (int(x), int(y)), plan.level, (nw, nh))
    if nw == nh == plan.tile_px and abs(w - nw) < 1e-6 and abs(h - nh) < 1e-6:
        return region
    return region.resize((plan.tile_px, plan.tile_px), Image.Resampling.BICUBIC, box=(0.0, 0.0, w, h))
