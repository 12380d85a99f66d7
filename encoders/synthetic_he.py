"""Rendering H&E-like images: tissue with pink fibrous stroma and sparse nuclei, planted tumour-like regions.

Sizes are in microns, so a slide looks the same at any pixel size. Used by
:mod:`encoders.synthetic_slides`, which writes the images as real slide files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BACKGROUND_RGB = (243, 241, 245)
STROMA_RGB = (236, 166, 200)  # eosin pink
STROMA_FIBRE_RGB = (214, 118, 168)  # denser collagen
NUCLEUS_RGB = (104, 66, 150)  # haematoxylin purple
TUMOUR_RGB = (186, 132, 192)  # lilac: crowded cytoplasm
TUMOUR_NUCLEUS_RGB = (62, 30, 104)  # dense, dark purple

STROMA_NUCLEUS_SPACING_UM = 28.0  # mean distance between stromal nuclei
TUMOUR_NUCLEUS_SPACING_UM = 9.0  # crowded
STROMA_NUCLEUS_RADIUS_UM = (2.0, 3.5)
TUMOUR_NUCLEUS_RADIUS_UM = (3.5, 6.0)


@dataclass(frozen=True)
class Ellipse:
    """A rotated ellipse in level-0 pixels: centre, semi-axes and rotation (radians)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0

    def radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius: < 1 inside, 1 on the outline."""
        dx, dy = np.asarray(x, float) - self.cx, np.asarray(y, float) - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (dx * c + dy * s) / self.rx, (-dx * s + dy * c) / self.ry
        return np.sqrt(u * u + v * v)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether level-0 points (x, y) lie inside."""
        return self.radius(x, y) <= 1.0

    def polygon(self, n: int = 64) -> np.ndarray:
        """``[n, 2]`` level-0 (x, y) points on the outline."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = self.rx * np.cos(t), self.ry * np.sin(t)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], axis=1)

    def scaled(self, factor: float) -> Ellipse:
        return Ellipse(self.cx, self.cy, self.rx * factor, self.ry * factor, self.angle)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Float32 noise of unit variance, smooth over about ``cell_y`` x ``cell_x`` pixels."""
    gh, gw = math.ceil(height / cell_y) + 2, math.ceil(width / cell_x) + 2
    coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
    fine = np.asarray(coarse.resize((round(gw * cell_x), round(gh * cell_y)), Image.Resampling.BICUBIC))
    fine = fine[:height, :width]
    return ((fine - fine.mean()) / max(float(fine.std()), 1e-6)).astype(np.float32)


def _fibres(rng: np.random.Generator, height: int, width: int, px_per_um: float) -> np.ndarray:
    """Streaky texture in [0, 1]: noise stretched along a random axis (collagen bundles)."""
    across, along = 5.0 * px_per_um, 50.0 * px_per_um
    cells = (along, across) if rng.random() < 0.5 else (across, along)
    return np.clip(0.45 + 0.25 * _smooth_noise(rng, height, width, *cells), 0.0, 1.0)


def _tissue_pieces(rng: np.random.Generator, width: int, height: int) -> tuple[Ellipse, ...]:
    if rng.random() < 0.6:
        return (Ellipse(width * rng.uniform(0.45, 0.55), height * rng.uniform(0.45, 0.55),
                        width * rng.uniform(0.33, 0.4), height * rng.uniform(0.33, 0.4), rng.uniform(-0.3, 0.3)),)
    # two pieces side by side along the long axis
    horizontal = width >= height
    pieces = []
    for i in range(2):
        along, across = (0.27 + 0.46 * i), rng.uniform(0.45, 0.55)
        cx, cy = (along, across) if horizontal else (across, along)
        rx = width * (rng.uniform(0.19, 0.22) if horizontal else rng.uniform(0.3, 0.38))
        ry = height * (rng.uniform(0.3, 0.38) if horizontal else rng.uniform(0.19, 0.22))
        pieces.append(Ellipse(width * cx, height * cy, rx, ry, rng.uniform(-0.25, 0.25)))
    return tuple(pieces)


def _tumours(rng: np.random.Generator, pieces: tuple[Ellipse, ...], n: int) -> tuple[Ellipse, ...]:
    """``n`` ellipses well inside the tissue pieces, not overlapping each other much."""
    out: list[Ellipse] = []
    for i in range(n):
        piece = pieces[i % len(pieces)]
        scale = rng.uniform(0.3, 0.4) if n == 1 else rng.uniform(0.24, 0.3)
        for _ in range(50):
            r, t = rng.uniform(0.0, 0.9 - scale * 1.2), rng.uniform(0, 2 * np.pi)
            c, s = math.cos(piece.angle), math.sin(piece.angle)
            u, v = r * piece.rx * math.cos(t), r * piece.ry * math.sin(t)
            cand = Ellipse(piece.cx + u * c - v * s, piece.cy + u * s + v * c,
                           scale * piece.rx * rng.uniform(0.8, 1.2), scale * piece.ry * rng.uniform(0.8, 1.2),
                           rng.uniform(0, np.pi))
            if all(math.hypot(cand.cx - o.cx, cand.cy - o.cy) > 1.1 * (max(cand.rx, cand.ry) + max(o.rx, o.ry))
                   for o in out):
                break
        out.append(cand)
    return tuple(out)


def _draw_nuclei(draw: ImageDraw.ImageDraw, rng: np.random.Generator, points: np.ndarray,
                 radius_px: tuple[float, float]) -> None:
    """Filled ellipses (random size, elongation and darkness) on an ``L`` layer."""
    n = len(points)
    r = rng.uniform(*radius_px, size=n)
    aspect = rng.uniform(0.65, 1.0, size=n)
    swap = rng.random(n) < 0.5
    rx, ry = np.where(swap, r * aspect, r), np.where(swap, r, r * aspect)
    shade = rng.integers(170, 256, size=n)
    for (x, y), a, b, v in zip(points, rx, ry, shade, strict=True):
        draw.ellipse((x - a, y - b, x + a, y + b), fill=int(v))


def _scatter(rng: np.random.Generator, width: int, height: int, spacing: float, jitter: float) -> np.ndarray:
    """Jittered hexagonal grid of points over the image (crowded when ``jitter`` is small)."""
    dy = spacing * math.sqrt(3) / 2
    ys = np.arange(0, height + dy, dy)
    xs = np.arange(0, width + spacing, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return pts + rng.normal(0, jitter * spacing, pts.shape)


def render_he(width: int, height: int, mpp: float = 0.5, seed: int = 0, n_tumour: int = 0
              ) -> tuple[np.ndarray, tuple[Ellipse, ...], tuple[Ellipse, ...]]:
    """An H&E-like RGB uint8 image ``[height, width, 3]`` with ``n_tumour`` planted regions.

    Returns ``(rgb, tumour_ellipses, tissue_ellipses)``. Tissue outlines are the ellipses
    roughened by smooth noise; every planted region lies inside tissue.
    """
    if width < 64 or height < 64 or mpp <= 0:
        raise ValueError(f"slide of {width}x{height} px at {mpp} mpp: need at least 64x64 px and mpp > 0")
    rng = np.random.default_rng(seed)
    px_per_um = 1.0 / mpp
    pieces = _tissue_pieces(rng, width, height)
    tumours = _tumours(rng, pieces, n_tumour)

    # Tissue: ellipse radius field roughened by noise, at 1/8 scale then upsampled (smooth edges).
    s = 8
    lh, lw = math.ceil(height / s), math.ceil(width / s)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32) * s + s / 2
    field = np.min([p.radius(xx, yy) for p in pieces], axis=0)
    cell = max(2.0, min(lh, lw) / 6)
    field += 0.12 * _smooth_noise(rng, lh, lw, cell, cell)
    for t in tumours:  # keep a rim of tissue around every planted region
        field = np.minimum(field, t.scaled(1.25).radius(xx, yy))
    field_full = np.asarray(Image.fromarray(field.astype(np.float32)).resize(
        (lw * s, lh * s), Image.Resampling.BILINEAR))[:height, :width]
    edge = 4.0 * px_per_um / min(min(p.rx, p.ry) for p in pieces)  # a soft edge of about 4 µm
    tissue_alpha = np.clip((1.0 - field_full) / edge + 0.5, 0.0, 1.0)

    # Planted regions (exact ellipses), rasterised at full resolution from their bounding boxes.
    tumour_mask = np.zeros((height, width), bool)
    for t in tumours:
        r = max(t.rx, t.ry)
        x0, x1 = max(0, int(t.cx - r)), min(width, int(t.cx + r) + 2)
        y0, y1 = max(0, int(t.cy - r)), min(height, int(t.cy + r) + 2)
        by, bx = np.mgrid[y0:y1, x0:x1]
        tumour_mask[y0:y1, x0:x1] |= t.contains(bx + 0.5, by + 0.5)

    # Nuclei on two L layers: sparse stromal nuclei, crowded tumour nuclei.
    normal_layer, tumour_layer = Image.new("L", (width, height), 0), Image.new("L", (width, height), 0)
    pts = _scatter(rng, width, height, STROMA_NUCLEUS_SPACING_UM * px_per_um, 0.45)
    xi, yi = np.clip(pts[:, 0].astype(int), 0, width - 1), np.clip(pts[:, 1].astype(int), 0, height - 1)
    keep = (tissue_alpha[yi, xi] > 0.5) & ~tumour_mask[yi, xi] & (rng.random(len(pts)) < 0.8)
    _draw_nuclei(ImageDraw.Draw(normal_layer), rng, pts[keep],
                 tuple(r * px_per_um for r in STROMA_NUCLEUS_RADIUS_UM))
    if tumours:
        pts = _scatter(rng, width, height, TUMOUR_NUCLEUS_SPACING_UM * px_per_um, 0.2)
        xi, yi = np.clip(pts[:, 0].astype(int), 0, width - 1), np.clip(pts[:, 1].astype(int), 0, height - 1)
        _draw_nuclei(ImageDraw.Draw(tumour_layer), rng, pts[tumour_mask[yi, xi]],
                     tuple(r * px_per_um for r in TUMOUR_NUCLEUS_RADIUS_UM))
    blur = ImageFilter.BoxBlur(max(0.5, 0.3 * px_per_um))  # soft nuclear outlines; box blur is cheap
    a_normal = np.asarray(normal_layer.filter(blur), np.float32) / 255.0
    a_tumour = np.asarray(tumour_layer.filter(blur), np.float32) / 255.0
    a_tumour *= tumour_mask  # nuclei drawn across the outline stay inside the region

    fibre = _fibres(rng, height, width, px_per_um)
    grain = rng.standard_normal((height, width), dtype=np.float32) * 3.0
    out = np.empty((height, width, 3), np.uint8)
    for ch in range(3):
        stroma = STROMA_RGB[ch] + (STROMA_FIBRE_RGB[ch] - STROMA_RGB[ch]) * fibre
        base = np.where(tumour_mask, np.float32(TUMOUR_RGB[ch]), stroma)
        base += (NUCLEUS_RGB[ch] - base) * a_normal
        base += (TUMOUR_NUCLEUS_RGB[ch] - base) * a_tumour
        px = BACKGROUND_RGB[ch] + (base - BACKGROUND_RGB[ch]) * tissue_alpha + grain
        np.clip(px, 0, 255, out=px)
        out[..., ch] = px
    return out, tumours, pieces
