"""Opening whole-slide images with OpenSlide, and their resolution in microns per pixel.

Every failure raises :class:`SlideError` with a message that names the file, so one bad
slide can be logged and listed without stopping a run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

logger = logging.getLogger(__name__)

# Resolutions outside this range are placeholders (e.g. 72 dpi = 352.8 µm/px), not scans.
PLAUSIBLE_MPP = (0.05, 50.0)
MPP_ANISOTROPY_WARN = 0.01


class SlideError(RuntimeError):
    """A slide that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class SlideRef:
    """One slide to extract: its id (the bag's file name), path and optional mpp override."""

    slide_id: str
    path: Path
    mpp: float | None = None  # from the slide CSV's `mpp` column


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide file does not exist")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: not a slide format OpenSlide recognises") from None
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"{path}: cannot open slide ({type(e).__name__}: {e})") from None


def metadata_mpp(slide: openslide.OpenSlide) -> tuple[float | None, str]:
    """(mpp, note) from the slide's properties; ``None`` with the reason when absent or implausible."""
    props = slide.properties
    try:
        mx = props.get(openslide.PROPERTY_NAME_MPP_X)
        my = props.get(openslide.PROPERTY_NAME_MPP_Y)
    except openslide.OpenSlideError as e:  # sticky error after a failed read
        return None, f"properties unreadable ({e})"
    if mx is None and my is None:
        return None, "no openslide.mpp-x/mpp-y property"
    values = [float(v) for v in (mx, my) if v is not None]
    mpp = float(np.mean(values))
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None, f"metadata mpp {mpp:g} is implausible: a placeholder, not a scan's resolution"
    if len(values) == 2 and abs(values[0] - values[1]) > MPP_ANISOTROPY_WARN * mpp:
        logger.warning("non-square pixels (mpp-x %s, mpp-y %s); using their mean %.4f", mx, my, mpp)
    return mpp, "metadata"


def resolve_mpp(slide: openslide.OpenSlide, ref: SlideRef, fallback: float | None) -> tuple[float, str]:
    """The slide's level-0 mpp and where it came from: CSV column, metadata, or config fallback.

    A per-slide CSV value wins (it is explicit); ``slides.mpp`` only fills in for slides
    whose metadata has none.
    """
    if ref.mpp is not None:
        return float(ref.mpp), "csv"
    mpp, note = metadata_mpp(slide)
    if mpp is not None:
        return mpp, "metadata"
    if fallback is not None:
        return float(fallback), "config"
    raise SlideError(
        f"{ref.path}: slide {ref.slide_id!r} has no usable resolution ({note}). Supply it as a "
        f"config override (slides.mpp=0.25) or in an `mpp` column of the slide CSV (slides.csv)"
    )


def background_rgb(slide: openslide.OpenSlide) -> tuple[int, int, int]:
    color = slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
    try:
        return int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16)
    except ValueError:
        return 255, 255, 255


def to_rgb(region: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGBA from ``read_region`` -> RGB, transparent (outside-scan) pixels on the background."""
    if region.mode != "RGBA" or region.getchannel("A").getextrema()[0] == 255:  # one band: 2x faster
        return region.convert("RGB")
    canvas = Image.new("RGB", region.size, background)
    canvas.paste(region, mask=region.getchannel("A"))
    return canvas


def read_region(slide: openslide.OpenSlide, path: Path, location: tuple[int, int], level: int,
                size: tuple[int, int]) -> Image.Image:
    """``read_region`` as RGB; a decoding failure names the file and the position."""
    try:
        region = slide.read_region(location, level, size)
    except openslide.OpenSlideError as e:
        raise SlideError(
            f"{path}: cannot read pixels at level-0 {location}, level {level} ({type(e).__name__}: {e})"
        ) from None
    return to_rgb(region, background_rgb(slide))


def read_thumbnail(slide: openslide.OpenSlide, path: Path, max_px: int) -> Image.Image:
    """An RGB thumbnail whose longest side is at most ``max_px``."""
    try:
        thumb = slide.get_thumbnail((max_px, max_px))
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: cannot read a thumbnail ({type(e).__name__}: {e})") from None
    return thumb.convert("RGB")
