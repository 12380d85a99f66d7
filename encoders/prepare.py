"""Per-slide preparation before encoding: resolution, tissue, tile grid and the QC thumbnail."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from encoders.qc import render_qc, save_qc
from encoders.slides import SlideError, SlideRef, open_slide, read_thumbnail, resolve_mpp_xy
from encoders.tiling import LEVEL_TOLERANCE, TilePlan, grid_coords, plan_tiles, tissue_fraction
from encoders.tissue import detect_tissue
from mil.config import default_workers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    target_mpp: float
    tile_px: int
    min_tissue: float
    thumbnail_px: int
    batch_size: int
    workers: int
    mpp_fallback: float | None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ExtractOptions:
        return cls(
            target_mpp=float(cfg.tiling.mpp),
            tile_px=int(cfg.tiling.tile_px),
            min_tissue=float(cfg.tiling.min_tissue),
            thumbnail_px=int(cfg.tiling.thumbnail_px),
            batch_size=int(cfg.encoder.batch_size),
            workers=default_workers() if cfg.loader.workers is None else int(cfg.loader.workers),
            mpp_fallback=None if cfg.slides.mpp is None else float(cfg.slides.mpp),
        )


@dataclass(frozen=True)
class PreparedSlide:
    """A slide ready to encode: where its tiles are and how to read them."""

    ref: SlideRef
    plan: TilePlan
    coords: np.ndarray  # [N, 2] level-0 (x, y) of the kept tiles
    width: int
    height: int
    mpp_source: str
    tissue_threshold: int
    seconds: float  # time spent preparing

    def bag_attrs(self, min_tissue: float, thumbnail_px: int) -> dict[str, Any]:
        """The slide-geometry attributes of its bag."""
        return {
            "tile_px": self.plan.tile_px,
            "mpp": self.plan.target_mpp,
            **self.plan.geometry_attrs(),  # true sizes only: x and y apart for non-square pixels
            "slide_mpp_source": self.mpp_source,
            "slide_width": self.width,
            "slide_height": self.height,
            "slide_id": self.ref.slide_id,
            "slide_file": self.ref.path.name,
            "read_level": self.plan.level,
            "min_tissue": min_tissue,
            "thumbnail_px": thumbnail_px,  # tissue detection depends on the thumbnail's size
            "tissue_threshold": self.tissue_threshold,
        }


def prepare_slide(ref: SlideRef, opt: ExtractOptions, qc_dir: Path,
                  defer_qc: Callable[[Callable[[], None]], None] | None = None) -> PreparedSlide:
    """Resolve mpp, detect tissue, keep the grid tiles with enough of it and write the QC PNG.

    ``defer_qc``: called with the function that renders and writes the QC PNG, to run it later
    (e.g. in a background thread while the tiles are encoded: it is not needed to encode them);
    by default it runs here. Raises :class:`SlideError` (naming the file) for unusable slides
    and slides without tissue, after their QC PNG is written or handed to ``defer_qc``: the
    error points to it.
    """
    start = time.perf_counter()
    with closing(open_slide(ref.path)) as slide:
        mpp_x, mpp_y, mpp_source = resolve_mpp_xy(slide, ref, opt.mpp_fallback)
        mpp = max(mpp_x, mpp_y)  # the coarser direction decides upsampling
        width, height = slide.dimensions
        plan = plan_tiles(mpp_x, opt.target_mpp, opt.tile_px, slide.level_downsamples, mpp_y)
        thumb = read_thumbnail(slide, ref.path, opt.thumbnail_px)
    if plan.level == 0 and mpp > opt.target_mpp * (1 + LEVEL_TOLERANCE):
        logger.warning("%s: slide mpp %.3f is coarser than the target %.3f: tiles are upsampled",
                       ref.slide_id, mpp, opt.target_mpp)
    tissue = detect_tissue(np.asarray(thumb), um_per_px=mpp_x * width / thumb.width)
    grid = grid_coords(width, height, plan.tile_size_level0, plan.tile_size_level0_y)
    fraction = tissue_fraction(grid, plan.tile_size_level0, tissue.mask, (width, height), plan.tile_size_level0_y)
    coords = grid[(fraction >= opt.min_tissue) & (fraction > 0)]
    caption = [
        f"{ref.slide_id}: {len(coords)} of {len(grid)} tiles with tissue >= {opt.min_tissue:g}",
        f"{opt.tile_px} px at {opt.target_mpp:g} mpp = {plan.tile_size_level0:.1f}"
        + ("" if plan.square else f" x {plan.tile_size_level0_y:.1f}") + " level-0 px; "
        f"read from level {plan.level}; slide {mpp_x:.4g}" + ("" if plan.square else f" x {mpp_y:.4g}")
        + f" mpp ({mpp_source}), {width}x{height}",
    ]

    def write_qc() -> None:
        save_qc(qc_dir / f"{ref.slide_id}.png",
                render_qc(thumb, tissue.mask, coords, plan.tile_size_level0, (width, height), caption,
                          plan.tile_size_level0_y))

    if defer_qc is None:
        write_qc()
    else:
        defer_qc(write_qc)
    if len(grid) == 0:
        raise SlideError(f"{ref.path}: slide of {width}x{height} px is smaller than one tile "
                         f"({plan.tile_size_level0:.0f} level-0 px at {opt.target_mpp:g} mpp)")
    if len(coords) == 0:
        raise SlideError(f"{ref.path}: no tissue: none of {len(grid)} tiles has a tissue fraction "
                         f">= {opt.min_tissue:g} (see qc/{ref.slide_id}.png)")
    return PreparedSlide(ref, plan, coords, width, height, mpp_source, tissue.threshold,
                         time.perf_counter() - start)
