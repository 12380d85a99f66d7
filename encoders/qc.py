"""QC thumbnail per slide: the thumbnail beside the same view with the tissue mask and kept tiles."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mil.io import atomic_path

PANEL_PX = 1024  # longest side of each panel
TISSUE_RGB = (0, 200, 0)
TILE_RGB = (0, 60, 255)


def render_qc(
    thumbnail: Image.Image,
    mask: np.ndarray,
    coords: np.ndarray,
    tile_size_level0: float,
    dimensions: tuple[int, int],
    caption: Sequence[str] = (),
    tile_size_level0_y: float | None = None,
) -> Image.Image:
    """Left: the thumbnail. Right: tissue tinted green, kept tiles outlined in blue."""
    thumb = thumbnail.convert("RGB")
    scale = min(1.0, PANEL_PX / max(thumb.size))
    size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
    left = thumb.resize(size, Image.Resampling.BOX)  # area mean: a third of Lanczos's cost, alike at 2:1
    tissue = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    tint = Image.new("RGB", size, TISSUE_RGB)
    right = Image.composite(Image.blend(left, tint, 0.35), left, tissue)
    draw = ImageDraw.Draw(right)
    sx, sy = size[0] / dimensions[0], size[1] / dimensions[1]
    size_y = tile_size_level0 if tile_size_level0_y is None else tile_size_level0_y
    for x, y in coords:
        draw.rectangle(
            (x * sx, y * sy, (x + tile_size_level0) * sx - 1, (y + size_y) * sy - 1),
            outline=TILE_RGB,
        )
    text_h = 14 * len(caption) + 6 if caption else 0
    canvas = Image.new("RGB", (2 * size[0] + 8, size[1] + text_h), (255, 255, 255))
    canvas.paste(left, (0, text_h))
    canvas.paste(right, (size[0] + 8, text_h))
    text = ImageDraw.Draw(canvas)
    for i, line in enumerate(caption):
        text.text((4, 3 + 14 * i), line, fill=(0, 0, 0))
    return canvas


def save_qc(path: str | os.PathLike, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)  # fast; QC files are written per slide
