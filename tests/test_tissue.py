"""Tissue detection's fast morphology equals scipy's, so tissue masks (and kept tiles) are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from encoders.tiling import grid_coords, tissue_fraction
from encoders.tissue import (
    CLOSING_UM,
    CROSS,
    MIN_AREA_UM2,
    MIN_VALUE,
    _components,
    detect_tissue,
    dilate_cross,
    erode_cross,
    otsu_threshold,
    saturation_value,
    small_holes,
)


def reference_tissue(rgb: np.ndarray, um_per_px: float, min_area_um2: float = MIN_AREA_UM2,
                     min_saturation: int = 20) -> np.ndarray:
    """The mask as computed with scipy.ndimage before the fast morphology (issue 14)."""
    sat, value = saturation_value(rgb)
    lit = value >= MIN_VALUE
    threshold = max(otsu_threshold(sat[lit]) if lit.any() else 255, min_saturation)
    mask = (sat > threshold) & lit
    radius = int(np.clip(round(CLOSING_UM / um_per_px), 1, 8))
    mask = ndimage.binary_closing(mask, structure=CROSS, iterations=radius, border_value=0)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    mask = mask | _components(holes, um_per_px, lambda area: area < min_area_um2)
    mask = ndimage.binary_opening(mask, structure=CROSS)
    return _components(mask, um_per_px, lambda area: area >= min_area_um2)


def random_masks(n: int = 12) -> list[np.ndarray]:
    """Blobs, speckle and masks that touch every border, in odd shapes."""
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(n):
        h, w = rng.integers(3, 90, size=2)
        noise = ndimage.uniform_filter(rng.random((h, w)), size=int(rng.integers(1, 6)))
        masks.append(noise > np.quantile(noise, rng.uniform(0.2, 0.8)))
    masks += [np.ones((7, 9), bool), np.zeros((5, 4), bool), np.eye(6, dtype=bool), np.ones((1, 5), bool)]
    return masks


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_cross_dilation_and_erosion_equal_scipy(iterations):
    for mask in random_masks():
        for ours, theirs in ((dilate_cross, ndimage.binary_dilation), (erode_cross, ndimage.binary_erosion)):
            expected = theirs(mask, structure=CROSS, iterations=iterations, border_value=0)
            np.testing.assert_array_equal(ours(mask, iterations), expected, err_msg=f"{ours.__name__} {mask.shape}")


def test_small_holes_equal_fill_holes_then_area_filter():
    rng = np.random.default_rng(1)
    for mask in random_masks():
        max_area = float(rng.integers(1, 40))
        holes = ndimage.binary_fill_holes(mask) & ~mask
        expected = _components(holes, 1.0, lambda area, m=max_area: area < m)
        np.testing.assert_array_equal(small_holes(mask, 1.0, max_area), expected)
    ring = np.ones((9, 9), bool)
    ring[3:6, 3:6] = False  # a 9-pixel hole
    assert small_holes(ring, 1.0, 10.0).sum() == 9 and small_holes(ring, 1.0, 9.0).sum() == 0


def blotchy_thumbnail(seed: int, shape: tuple[int, int] = (300, 400)) -> np.ndarray:
    """Pink tissue blobs with holes and specks on near-white glass, plus a dark scanner border."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 6)
    tissue = field > np.quantile(field, 0.55)
    tissue ^= rng.random(shape) < 0.02  # specks and pinholes
    rgb = np.full((*shape, 3), 235, np.uint8) + rng.integers(0, 12, (*shape, 3), dtype=np.uint8)
    rgb[tissue] = (np.array([200, 110, 170]) + rng.integers(-25, 25, (int(tissue.sum()), 3))).clip(0, 255)
    rgb[:, :3] = 10  # black border: never tissue
    return rgb.astype(np.uint8)


@pytest.mark.parametrize(("seed", "um_per_px"), [(0, 2.0), (1, 4.0), (2, 8.0), (3, 16.0)])
def test_detect_tissue_equals_the_scipy_pipeline(seed, um_per_px):
    rgb = blotchy_thumbnail(seed)
    expected = reference_tissue(rgb, um_per_px, min_area_um2=50 * um_per_px**2)
    mask = detect_tissue(rgb, um_per_px, min_area_um2=50 * um_per_px**2).mask
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(mask, expected)


def test_tissue_fraction_equals_pixel_counting():
    rng = np.random.default_rng(2)
    mask = rng.random((97, 131)) < 0.4
    dims = (2620, 1940)  # 20 level-0 px per mask pixel
    size = 87.3
    grid = grid_coords(*dims, size)
    fraction = tissue_fraction(grid, size, mask, dims)
    for (x, y), f in zip(grid, fraction, strict=True):
        x0, y0 = min(round(x / 20), 130), min(round(y / 20), 96)
        x1, y1 = max(round((x + size) / 20), x0 + 1), max(round((y + size) / 20), y0 + 1)
        assert f == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-12)
