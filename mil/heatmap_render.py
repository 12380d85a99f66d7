"""Drawing attention heatmaps: tile scores -> a raster over the slide thumbnail, colour bar, tile grids.

Geometry: a raster pixel belongs to a tile when the pixel's centre, mapped back to level-0
coordinates, lies inside the tile's real extent ``[x, x + tile_size) x [y, y + tile_size)``.
The scale is taken per axis (``raster_width / slide_width``, ``raster_height / slide_height``),
so a thumbnail whose sides were rounded separately, or a slide whose size is not a multiple
of the tile size, still puts every tile's heat where the tile is.

Text is drawn with matplotlib's bundled DejaVu Sans (a TrueType font with the glyphs we write,
``µ`` included): PIL's default font lacks ``µ`` and draws a missing-glyph box in its place.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from scipy.stats import rankdata

CMAP = "turbo"
ALPHA = 0.5  # opacity of the colour map over the tissue
OUTLINE_RGB = (25, 25, 25)
BAR_PX = (22, 256)  # colour bar width, minimum height
TEXT_PX = 14
GRID_TILE_PX = 160  # side of each tile in the top/bottom grid
# Tile corners are whole level-0 pixels rounded from a fractional grid, so neighbours can sit up to
# one pixel apart: each tile is painted one level-0 pixel wider, or a grid shows hairline gaps.
SEAM_PX = 1.0
FONT_FAMILY = "DejaVu Sans"  # ships with matplotlib, a core dependency
FONT_FILE = "DejaVuSans.ttf"
MISSING_GLYPH = "\uffff"  # a noncharacter: no font has it, so it renders as the font's missing-glyph box

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

logger = logging.getLogger(__name__)


@functools.cache
def _truetype_path() -> str | None:
    """Path of matplotlib's DejaVu Sans, or None when it cannot be found (logged once)."""
    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT_FILE
    if bundled.is_file():
        return str(bundled)
    try:
        from matplotlib import font_manager

        return font_manager.findfont(FONT_FAMILY, fallback_to_default=False)
    except (ValueError, OSError, RuntimeError) as e:
        logger.warning("%s not found (%s): heatmap text uses PIL's default font, µm written as um", FONT_FAMILY, e)
        return None


@functools.cache
def font(size: int = TEXT_PX) -> Font:
    """The font for text of ``size`` px in heatmap images (cached per size).

    DejaVu Sans from matplotlib, which has every glyph we draw (``µ`` included); PIL's default
    font if that cannot be loaded (it lacks ``µ``: :func:`_um_label` then writes ``um``).
    """
    path = _truetype_path()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except (OSError, ImportError, ValueError) as e:  # ImportError: Pillow built without FreeType
            logger.warning("cannot load %s (%s): heatmap text uses PIL's default font, µm written as um", path, e)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def has_glyphs(f: Font, text: str) -> bool:
    """Whether ``f`` draws a real glyph for every character of ``text`` (not its missing-glyph box).

    A TrueType font's missing glyphs all render as the mask of :data:`MISSING_GLYPH`; PIL's old
    bitmap font is only trusted with ASCII.
    """
    if not isinstance(f, ImageFont.FreeTypeFont):
        return text.isascii()

    def mask(ch: str) -> tuple[tuple[int, int], bytes]:
        m = f.getmask(ch)
        return m.size, bytes(m)

    missing = mask(MISSING_GLYPH)
    return all(ch.isspace() or mask(ch) != missing for ch in set(text))


def percentile_scores(scores: np.ndarray) -> np.ndarray:
    """Each score's percentile rank within the slide, in [0, 1] (ties share their mean rank).

    Attention weights are heavy-tailed (a softmax): min-max scaling would show a few hot tiles
    on a uniformly cold slide. Ranks spread the colour map over the ordering instead, as in
    CLAM's heatmaps; the raw values are kept in the scores CSV.
    """
    scores = np.asarray(scores, float)
    if len(scores) < 2:
        return np.ones(len(scores))
    return (rankdata(scores, method="average") - 1.0) / (len(scores) - 1.0)


def heat_raster(
    coords: np.ndarray,
    values: np.ndarray,
    tile_size: float,
    slide_size: tuple[int, int],
    raster_size: tuple[int, int],
) -> np.ndarray:
    """Float32 ``[h, w]`` raster of ``values`` painted at each tile's extent; NaN where no tile.

    ``coords`` [N, 2] are level-0 top-left corners, ``tile_size`` the tile side in level-0
    pixels (may be fractional), ``slide_size`` the level-0 (width, height) and ``raster_size``
    the (width, height) of the raster (e.g. of a thumbnail). A tile covers the pixels whose
    centres fall in ``[x, x + tile_size + SEAM_PX)`` (likewise in y); overlapping tiles average.
    A tile smaller than a raster pixel still covers the pixel its centre falls in.
    """
    (W, H), (w, h) = slide_size, raster_size
    sx, sy = w / W, h / H
    coords = np.asarray(coords, float).reshape(-1, 2)
    values = np.asarray(values, float)

    def span(start: np.ndarray, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.ceil(start * scale - 0.5).astype(np.int64)  # first pixel whose centre is inside
        hi = np.ceil((start + tile_size + SEAM_PX) * scale - 0.5).astype(np.int64)  # first one past the end
        small = hi <= lo
        lo = np.where(small, np.floor((start + tile_size / 2) * scale).astype(np.int64), lo)
        hi = np.where(small, lo + 1, hi)
        return np.clip(lo, 0, limit), np.clip(hi, 0, limit)

    x0, x1 = span(coords[:, 0], sx, w)
    y0, y1 = span(coords[:, 1], sy, h)
    total = np.zeros((h + 1, w + 1))
    count = np.zeros((h + 1, w + 1))
    # Difference arrays: +v at the top-left corner, -v past the right and bottom edges.
    for grid, v in ((total, values), (count, np.ones_like(values))):
        np.add.at(grid, (y0, x0), v)
        np.add.at(grid, (y0, x1), -v)
        np.add.at(grid, (y1, x0), -v)
        np.add.at(grid, (y1, x1), v)
    total = total.cumsum(0).cumsum(1)[:h, :w]
    count = np.rint(count.cumsum(0).cumsum(1)[:h, :w])
    out = np.full((h, w), np.nan, np.float32)
    np.divide(total, count, out=out, where=count > 0, casting="unsafe")
    return out


def colourise(raster: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[h, w, 3]`` of a [0, 1] raster through the colour map (NaN -> 0)."""
    lut = (colormaps[CMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    idx = np.clip(np.nan_to_num(raster, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    return lut[idx]


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a boolean mask, ``width`` pixels thick on the inside."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def overlay_panel(thumbnail: Image.Image, raster: np.ndarray, tissue: np.ndarray | None = None,
                  alpha: float = ALPHA) -> Image.Image:
    """The thumbnail with the colour-mapped raster blended over covered pixels (opacity ``alpha``)
    and the tissue outline on top.

    The panel has exactly the thumbnail's size: raster pixel (i, j) is thumbnail pixel (i, j).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay opacity must lie in [0, 1], got {alpha}")
    base = np.asarray(thumbnail.convert("RGB"), np.float32)
    if raster.shape != base.shape[:2]:
        raise ValueError(f"raster {raster.shape} does not match the thumbnail {base.shape[:2]}")
    covered = ~np.isnan(raster)
    colour = colourise(raster).astype(np.float32)
    out = np.where(covered[..., None], (1 - alpha) * base + alpha * colour, base)
    if tissue is not None:
        if tissue.shape != raster.shape:
            tissue = np.asarray(Image.fromarray(tissue.astype(np.uint8) * 255).resize(
                (raster.shape[1], raster.shape[0]), Image.Resampling.NEAREST)) > 0
        out[outline(tissue, width=max(1, round(max(raster.shape) / 800)))] = OUTLINE_RGB
    return Image.fromarray(out.round().astype(np.uint8))


def scatter_panel(raster: np.ndarray) -> Image.Image:
    """Tiles coloured at their positions on white: the view when the slide file is not available."""
    covered = ~np.isnan(raster)
    out = np.where(covered[..., None], colourise(raster), np.uint8(255))
    return Image.fromarray(out.astype(np.uint8))


def text_px_for(panel: Image.Image) -> int:
    """Caption size that stays legible when a large panel is viewed scaled down."""
    return max(TEXT_PX, round(max(panel.size) / 90))


def colour_bar(height: int, label: str, text_px: int = TEXT_PX) -> Image.Image:
    """A vertical colour bar (high at the top) with ticks at 0, 25, 50, 75, 100 and a title."""
    f = font(text_px)
    bar_w = round(BAR_PX[0] * text_px / TEXT_PX)
    height = max(height - 2 * text_px, BAR_PX[1])
    img = Image.new("RGB", (bar_w + 4 * text_px, height + 2 * text_px), "white")
    ramp = np.linspace(1, 0, height)[:, None].repeat(bar_w, 1)
    img.paste(Image.fromarray(colourise(ramp)), (0, text_px))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, text_px, bar_w - 1, text_px + height - 1), outline=(0, 0, 0))
    for q in (0, 25, 50, 75, 100):
        y = text_px + round((1 - q / 100) * (height - 1))
        draw.line((bar_w, y, bar_w + text_px // 3, y), fill=(0, 0, 0))
        draw.text((bar_w + text_px // 2, y), f"{q}", fill=(0, 0, 0), font=f, anchor="lm")
    title = vertical_text(label, text_px)
    out = Image.new("RGB", (img.width + title.width + 4, img.height), "white")
    out.paste(img, (0, 0))
    out.paste(title, (img.width + 2, max(0, (img.height - title.height) // 2)))
    return out


def vertical_text(text: str, text_px: int = TEXT_PX) -> Image.Image:
    """``text`` rendered black on white and turned 90 degrees anticlockwise (reads bottom to top)."""
    f = font(text_px)
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=f)
    img = Image.new("RGB", (box[2] + 2, round(text_px * 1.4)), "white")
    ImageDraw.Draw(img).text((1, 1), text, fill=(0, 0, 0), font=f)
    return img.rotate(90, expand=True)


def with_header(body: Image.Image, lines: Sequence[str], right: Image.Image | None = None,
                text_px: int = TEXT_PX) -> Image.Image:
    """``body`` (and ``right`` beside it, e.g. a colour bar) under caption lines."""
    f = font(text_px)
    line_h = round(text_px * 1.3)
    head = line_h * len(lines) + text_px // 2
    gap = text_px
    width = body.width + (right.width + gap if right is not None else 0)
    draw_w = max(width, max((int(ImageDraw.Draw(body).textlength(t, font=f)) + 8 for t in lines), default=0))
    height = head + max(body.height, right.height if right is not None else 0)
    canvas = Image.new("RGB", (draw_w, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((4, 3 + i * line_h), text, fill=(0, 0, 0), font=f)
    canvas.paste(body, (0, head))
    if right is not None:
        canvas.paste(right, (body.width + gap, head))
    return canvas


def tile_grid(rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[str]]]) -> Image.Image:
    """Rows of captioned tiles: ``(row title, tiles, one caption per tile)``."""
    f = font(12)
    side, cap_h, title_h, gap = GRID_TILE_PX, 30, TEXT_PX + 8, 6
    n_cols = max((len(t) for _, t, _ in rows), default=1) or 1
    width = n_cols * (side + gap) + gap
    height = sum(title_h + side + cap_h for _ in rows) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = gap
    for title, tiles, captions in rows:
        draw.text((gap, y), title, fill=(0, 0, 0), font=font())
        y += title_h
        for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
            x = gap + i * (side + gap)
            canvas.paste(tile.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (x, y))
            for j, part in enumerate(caption.split("\n")[:2]):
                draw.text((x, y + side + 2 + 13 * j), part, fill=(0, 0, 0), font=f)
        y += side + cap_h
    return canvas


def nice_length(target: float) -> float:
    """The 1, 2 or 5 x 10^k value at or below ``target`` (> 0): a round scale-bar length."""
    power = 10.0 ** np.floor(np.log10(target))
    return float(max(m * power for m in (1, 2, 5) if m * power <= target))


def _um_label(um: float, f: Font) -> str:
    """``um`` as a length label in mm or µm; ``um`` for µm when the font ``f`` lacks the ``µ`` glyph."""
    if um >= 1000:
        return f"{um / 1000:g} mm"
    micro = "µ" if has_glyphs(f, "µ") else "u"
    return f"{um:g} {micro}m"


def scale_bar(panel: Image.Image, um_per_px: float, text_px: int = TEXT_PX) -> Image.Image:
    """``panel`` with a scale bar (about a fifth of its width, a round number of µm) at the bottom left."""
    out = panel.convert("RGB").copy()
    length_um = nice_length(um_per_px * out.width / 5)
    length = max(1, round(length_um / um_per_px))
    draw = ImageDraw.Draw(out)
    pad, thick = max(4, text_px // 2), max(3, text_px // 3)
    x0, y1 = pad, out.height - pad
    f = font(text_px)
    label = _um_label(length_um, f)
    box = draw.textbbox((0, 0), label, font=f)
    draw.rectangle((x0 - 3, y1 - thick - (box[3] - box[1]) - 9, x0 + max(length, box[2]) + 3, y1 + 3), fill="white")
    draw.rectangle((x0, y1 - thick, x0 + length, y1), fill=(0, 0, 0))
    draw.text((x0, y1 - thick - 3), label, fill=(0, 0, 0), font=f, anchor="ld")
    return out


def micron_axes(panel: Image.Image, um_per_px: float, text_px: int = TEXT_PX) -> Image.Image:
    """``panel`` framed by x and y axes with ticks in µm (level-0 position times the slide's mpp)."""
    f = font(text_px)
    margin_left, margin_bottom = 5 * text_px, 2 * text_px + 4
    out = Image.new("RGB", (panel.width + margin_left + text_px, panel.height + margin_bottom + text_px // 2), "white")
    out.paste(panel.convert("RGB"), (margin_left, text_px // 2))
    draw = ImageDraw.Draw(out)
    x0, y0 = margin_left, text_px // 2
    draw.rectangle((x0 - 1, y0 - 1, x0 + panel.width, y0 + panel.height), outline=(0, 0, 0))
    step = nice_length(um_per_px * max(panel.size) / 5)
    for axis, extent in (("x", panel.width), ("y", panel.height)):
        um = 0.0
        while um / um_per_px <= extent:
            px = round(um / um_per_px)
            if axis == "x":
                draw.line((x0 + px, y0 + panel.height, x0 + px, y0 + panel.height + 4), fill=(0, 0, 0))
                draw.text((x0 + px, y0 + panel.height + 5), _um_label(um, f), fill=(0, 0, 0), font=f, anchor="mt")
            else:
                draw.line((x0 - 5, y0 + px, x0 - 1, y0 + px), fill=(0, 0, 0))
                draw.text((x0 - 7, y0 + px), _um_label(um, f), fill=(0, 0, 0), font=f, anchor="rm")
            um += step
    return out


def side_by_side(left: Image.Image, right: Image.Image, gap: int = TEXT_PX) -> Image.Image:
    """Two panels next to each other on white, tops aligned (e.g. the H&E thumbnail and its overlay)."""
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(right.convert("RGB"), (left.width + gap, 0))
    return out
