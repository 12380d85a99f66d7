"""Tissue detection on a slide thumbnail: Otsu on saturation, morphological clean-up, minimum area.

Holes smaller than the minimum area are filled (nuclei, cracks); larger ones (lumens, fat)
stay background.

Stained tissue is coloured, glass and background are grey or white: the HSV saturation
separates them well across stains and scanners. Near-black pixels (scanner borders, dust)
have unstable saturation and are never tissue.

The binary morphology with a 3x3 cross is done with shifted numpy boolean operations, and
small holes are found by labelling the background once: the result equals
``scipy.ndimage.binary_closing`` / ``binary_fill_holes`` / ``binary_opening`` with the same
structure and borders (tests pin this), about 2.5x faster on a 2,048-px thumbnail
(``benchmarks/extract_profile.py``: 0.27 s instead of 0.66 s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_SATURATION = 20  # of 255: floor under Otsu's threshold, so a blank slide yields no tissue
MIN_VALUE = 40  # of 255: darker pixels are not tissue
MIN_AREA_UM2 = 10_000.0  # tissue pieces smaller than 100 µm x 100 µm are dropped
CLOSING_UM = 16.0  # gaps narrower than about this are closed
CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # bool [h, w] at thumbnail resolution
    threshold: int  # saturation threshold used (0-255)
    um_per_px: float  # thumbnail pixel size


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (uint8, 0-255) and value (float32) of an RGB uint8 image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.float32)  # faster than max over a 3-wide axis
    lo = np.minimum(np.minimum(r, g), b).astype(np.float32)
    sat = np.zeros(hi.shape, np.float32)
    np.divide((hi - lo) * 255.0, hi, out=sat, where=hi > 0)
    return sat.round().astype(np.uint8), hi


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255) of an RGB uint8 image."""
    return saturation_value(rgb)[0]


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (the class boundary maximising between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    if hist.sum() == 0:
        return 255
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = 0.0
    return int(np.argmax(between))


def detect_tissue(
    thumbnail: np.ndarray,
    um_per_px: float,
    min_area_um2: float = MIN_AREA_UM2,
    min_saturation: int = MIN_SATURATION,
) -> TissueMask:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are ``um_per_px`` wide."""
    rgb = np.asarray(thumbnail)[..., :3]
    sat, value = saturation_value(rgb)
    lit = value >= MIN_VALUE
    threshold = max(otsu_threshold(sat[lit]) if lit.any() else 255, min_saturation)
    mask = (sat > threshold) & lit
    # Closing by `radius` iterations of a 3x3 cross: a diamond, far cheaper than a large disk.
    radius = int(np.clip(round(CLOSING_UM / um_per_px), 1, 8))
    mask = erode_cross(dilate_cross(mask, radius), radius)
    mask = mask | small_holes(mask, um_per_px, min_area_um2)  # not lumens
    mask = dilate_cross(erode_cross(mask, 1), 1)  # opening: drops one-pixel spurs and lines
    mask = _components(mask, um_per_px, lambda area: area >= min_area_um2)
    return TissueMask(mask=mask, threshold=threshold, um_per_px=um_per_px)


def dilate_cross(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation of a 2-D bool mask by ``iterations`` 3x3 crosses, outside the image empty.

    Equals ``ndimage.binary_dilation(mask, CROSS, iterations, border_value=0)``.
    """
    out = np.array(mask, dtype=bool)
    for _ in range(iterations):
        src = out.copy()
        out[1:] |= src[:-1]
        out[:-1] |= src[1:]
        out[:, 1:] |= src[:, :-1]
        out[:, :-1] |= src[:, 1:]
    return out


def erode_cross(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion of a 2-D bool mask by ``iterations`` 3x3 crosses, outside the image empty.

    Equals ``ndimage.binary_erosion(mask, CROSS, iterations, border_value=0)``: pixels on the
    image border erode, as if the slide went on as background.
    """
    out = np.array(mask, dtype=bool)
    for _ in range(iterations):
        src = out.copy()
        out[1:] &= src[:-1]
        out[:-1] &= src[1:]
        out[:, 1:] &= src[:, :-1]
        out[:, :-1] &= src[:, 1:]
        out[[0, -1], :] = False
        out[:, [0, -1]] = False
    return out


def small_holes(mask: np.ndarray, um_per_px: float, max_area_um2: float) -> np.ndarray:
    """The holes of ``mask`` (background not 4-connected to the image border) smaller than ``max_area_um2``.

    Equals ``_components(ndimage.binary_fill_holes(mask) & ~mask, ...)`` with ``area < max_area_um2``:
    the holes are whole 4-connected components of the background, so one labelling of the
    background finds them and their areas.
    """
    labels, n = ndimage.label(~mask, structure=CROSS)
    if n == 0:
        return np.zeros(mask.shape, bool)
    keep = np.bincount(labels.ravel(), minlength=n + 1) * um_per_px**2 < max_area_um2
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        keep[edge] = False  # touches the border: outside the tissue, not a hole
    keep[0] = False  # the mask itself
    return keep[labels]


def _components(mask: np.ndarray, um_per_px: float, keep: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The connected components of ``mask`` whose area in µm² passes ``keep``."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    areas = np.bincount(labels.ravel())[1:] * um_per_px**2
    return np.concatenate([[False], keep(areas)])[labels]
