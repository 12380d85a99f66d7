"""Synthetic whole-slide images (encoders.synthetic_slides): real format, determinism, ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from encoders.slides import SlideRef, open_slide, read_thumbnail, resolve_mpp
from encoders.synthetic_he import BACKGROUND_RGB, Ellipse
from encoders.synthetic_slides import (
    SyntheticSlide,
    load_ground_truth,
    make_slide_cohort,
    render_he,
    write_slide,
)
from encoders.tissue import detect_tissue


@pytest.mark.parametrize(("mpp", "compression"), [(0.5, "auto"), (0.25, "zlib")])  # auto: JPEG with imagecodecs
def test_openslide_reads_a_generic_tiff_pyramid_with_the_mpp(tmp_path, mpp, compression):
    s = write_slide(tmp_path / "a.tiff", 1100, 700, mpp=mpp, seed=1, n_tumour=1, compression=compression)
    with open_slide(s.path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert resolve_mpp(slide, SlideRef("a", s.path), None) == (pytest.approx(mpp), "metadata")
        assert slide.dimensions == (1100, 700)
        assert slide.level_count >= 2 and slide.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        pixels = np.asarray(slide.read_region((0, 0), 0, (1100, 700)).convert("RGB")).astype(int)
    rgb = render_he(1100, 700, mpp, seed=1, n_tumour=1)[0].astype(int)
    error = np.abs(pixels - rgb)
    assert error.max() == 0 if compression == "zlib" else error.mean() < 4


def test_same_seed_same_slide_other_seed_other_slide():
    a, ta, pa = render_he(700, 520, 0.5, seed=7, n_tumour=2)
    b, tb, pb = render_he(700, 520, 0.5, seed=7, n_tumour=2)
    c, tc, _ = render_he(700, 520, 0.5, seed=8, n_tumour=2)
    assert np.array_equal(a, b) and ta == tb and pa == pb
    assert not np.array_equal(a, c) and ta != tc


def test_planted_regions_look_different_and_lie_in_detected_tissue(tmp_path):
    s = write_slide(tmp_path / "t.tiff", 1600, 1200, mpp=0.5, seed=3, n_tumour=2)
    rgb = render_he(1600, 1200, 0.5, seed=3, n_tumour=2)[0].astype(float)
    yy, xx = np.mgrid[0:1200, 0:1600] + 0.5
    tumour = s.in_tumour(xx, yy)
    tissue_not_tumour = np.zeros_like(tumour)
    for piece in s.tissue:
        tissue_not_tumour |= piece.scaled(0.8).contains(xx, yy)
    tissue_not_tumour &= ~np.any([t.scaled(1.3).contains(xx, yy) for t in s.tumour], axis=0)
    assert len(s.tumour) == 2 and tumour.mean() > 0.03
    # Tumour: darker and bluer (crowded haematoxylin) than the pink stroma; background near white.
    t_rgb, s_rgb = rgb[tumour].mean(0), rgb[tissue_not_tumour].mean(0)
    assert t_rgb.sum() < s_rgb.sum() - 150 and t_rgb[0] < t_rgb[2] and s_rgb[0] > s_rgb[2]
    assert np.abs(rgb[0:20, 0:20].mean((0, 1)) - BACKGROUND_RGB).max() < 6
    # The pipeline's tissue detector sees the tissue and every planted region inside it.
    with open_slide(s.path) as slide:
        thumb = np.asarray(read_thumbnail(slide, s.path, 400))
    mask = detect_tissue(thumb, um_per_px=0.5 * 1600 / thumb.shape[1]).mask
    sy, sx = mask.shape[0] / 1200, mask.shape[1] / 1600
    for t in s.tumour:
        pts = np.concatenate([t.scaled(f).polygon(16) for f in (0.0, 0.5, 0.95)])
        assert mask[(pts[:, 1] * sy).astype(int), (pts[:, 0] * sx).astype(int)].all()
    assert 0.2 < mask.mean() < 0.8


def test_ellipse_geometry():
    e = Ellipse(100, 50, 40, 10, angle=np.pi / 2)  # rotated: long axis vertical
    assert e.contains(100, 85) and not e.contains(135, 50)
    assert np.allclose(e.radius(*e.polygon(12).T), 1.0)


def test_cohort_tables_labels_and_ground_truth(tmp_path):
    c = make_slide_cohort(tmp_path / "c", n_patients=6, slides_per_patient=(1, 2), positive_fraction=0.5, seed=2,
                          size=(520, 400), classes=("MSS", "MSI-H"))
    slides = pd.read_csv(c.slide_csv, dtype=str)
    clinical = pd.read_csv(c.clinical_csv, dtype=str)
    assert list(slides.columns) == ["patient_id", "slide_id", "path"] and list(clinical.columns) == ["patient_id", "MSI"]
    assert sorted(clinical.MSI.value_counts().items()) == [("MSI-H", 3), ("MSS", 3)]
    assert set(slides.patient_id) == set(clinical.patient_id) and slides.slide_id.is_unique
    assert all((c.slide_csv.parent / p).is_file() for p in slides.path)
    label = dict(zip(clinical.patient_id, clinical.MSI, strict=True))
    for row in slides.itertuples():
        s = c.slides[row.slide_id]
        assert (len(s.tumour) > 0) == (label[row.patient_id] == "MSI-H"), row.slide_id
        assert (s.width, s.height) != (520, 400) and abs(s.width / 520 - 1) <= 0.15
    assert load_ground_truth(c.ground_truth) == c.slides
    again = make_slide_cohort(tmp_path / "d", n_patients=6, positive_fraction=0.5, seed=2, size=(520, 400))
    assert [s.tumour for s in again.slides.values()] == [s.tumour for s in c.slides.values()]


def test_tumour_fraction_of_tiles():
    s = SyntheticSlide("s", Path("s.tiff"), 400, 400, 0.5, (Ellipse(200, 200, 100, 100),), ())
    f = s.tumour_fraction(np.array([[175, 175], [0, 0], [280, 180]]), 50)  # inside, outside, across the edge
    assert f[0] == 1.0 and f[1] == 0.0 and 0.3 < f[2] < 0.7


@pytest.mark.parametrize("kwargs", [{"positive_fraction": 1.5}, {"n_patients": 0}, {"compression": "lzw"}])
def test_bad_arguments_are_named(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_slide_cohort(tmp_path, **{"n_patients": 2, "size": (200, 200), **kwargs})
