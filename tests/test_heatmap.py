"""`mil heatmap` on real synthetic slides: geometry, attention on planted regions, every attention model."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from encoders.extract import run_extract
from encoders.slides import open_slide, read_thumbnail
from encoders.synthetic_slides import make_slide_cohort, write_slide
from encoders.tiling import grid_coords
from mil import heatmap_render
from mil.attention import attention_models, ensemble_attention
from mil.bags import read_bag_info, read_coords
from mil.commands.heatmap import HeatmapError, run_heatmap, tile_size_level0
from mil.config import ConfigError, load_config
from mil.crossval import run_crossval, run_train
from mil.heatmap_render import (
    font,
    heat_raster,
    overlay_panel,
    percentile_scores,
    scale_bar,
    text_px_for,
)
from mil.models import MILOutput

NO_GLYPH = "\uffff"  # a noncharacter: every font draws its missing-glyph box for it

TRAIN = [
    "model.args={hidden_dim: 32}", "cv.folds=2", "cv.bootstrap=20", "train.max_epochs=15", "train.min_steps=0", "train.refit=false", "train.min_epochs=1",
    "train.batch_size=4", "train.bag_size=null", "train.lr=3e-3", "train.standardize=true",
    "train.precision=32-true", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """16 patients, 1-2 slides each (1024x800 px +-15% at 0.5 mpp), bags of 64 px tiles from random-vit-tiny."""
    root = tmp_path_factory.mktemp("heatmap")
    cohort = make_slide_cohort(root, n_patients=16, positive_fraction=0.5, seed=5, size=(1024, 800))
    run_extract(load_config([
        f"slides.csv={cohort.slide_csv}", f"features_dir={root / 'bags'}", "encoder.name=random-vit-tiny",
        "encoder.device=cpu", "encoder.batch_size=64", "loader.workers=0", "tiling.tile_px=64", "tiling.thumbnail_px=512",
    ]))
    cohort_keys = [f"cohort.clinical_csv={cohort.clinical_csv}", f"cohort.slide_csv={cohort.slide_csv}",
                   f"cohort.features_dir={root / 'bags'}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]"]
    return cohort, root, cohort_keys


@pytest.fixture(scope="module")
def abmil_run(slides):
    _, root, keys = slides
    return run_crossval(load_config([*keys, *TRAIN, "model.name=gated_abmil", f"output_dir={root / 'cv'}"]))


def quick_run(slides, name: str, tmp_path, *extra: str):
    _, _, keys = slides
    return run_train(load_config([*keys, *TRAIN, "train.max_epochs=1", f"model.name={name}",
                                  f"output_dir={tmp_path / name}", *extra]))


# ---------------------------------------------------------------- geometry
def test_heat_raster_paints_each_tile_at_its_real_extent():
    # A 1000 x 700 slide (not a multiple of the 224 px tile) drawn at 100 x 71: x and y scales differ.
    raster = heat_raster(np.array([[448, 224], [0, 0]]), np.array([1.0, 0.25]), 224, (1000, 700), (100, 71))
    covered = np.argwhere(raster == 1.0)
    # pixel i is in the tile when its centre (i + 0.5) / scale lies in [x, x + 224 + 1) (1: the seam)
    assert covered[:, 1].min() == 45 and covered[:, 1].max() == 66
    assert covered[:, 0].min() == 23 and covered[:, 0].max() == 45  # 71 / 700 = 0.1014 per level-0 px
    assert (raster == 0.25).sum() == 22 * 23 and np.isnan(raster).sum() == 100 * 71 - 2 * 22 * 23
    # Overlapping tiles average; a tile smaller than a pixel still shows.
    over = heat_raster(np.array([[0, 0], [0, 0], [990, 690]]), np.array([1.0, 0.0, 0.5]), 5, (1000, 700), (10, 7))
    assert over[0, 0] == 0.5 and over[6, 9] == 0.5 and np.isnan(over).sum() == 68


def test_tile_size_from_the_bag_attributes_or_the_grid(tmp_path):
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    assert tile_size_level0({"tile_size_level0": 98.5}, coords, tmp_path) == 98.5
    assert tile_size_level0({"tile_px": 224, "mpp": 0.5, "slide_mpp": 0.25}, coords, tmp_path) == 448
    assert tile_size_level0({"tile_px": 224}, coords, tmp_path) == 100  # foreign bag: the grid step
    with pytest.raises(HeatmapError, match="cannot tell the tile size"):
        tile_size_level0({}, coords[:1], tmp_path)


def test_scale_bar_label_draws_a_real_micro_sign(monkeypatch):
    """The scale bar's "µm" is drawn with a glyph for µ, not the font's missing-glyph box ("200 ☐m")."""
    panel = Image.new("RGB", (500, 300), "white")
    text_px = text_px_for(panel)
    f = font(text_px)
    micro, missing = f.getmask("µ"), f.getmask(NO_GLYPH)
    assert (micro.size, bytes(micro)) != (missing.size, bytes(missing)), f"{f.getname()} has no glyph for µ"
    drawn = scale_bar(panel, 1.0, text_px)  # 100 µm (a fifth of 500 px at 1 µm/px)
    assert heatmap_render._um_label(100, f) == "100 µm"
    # The same bar with the label's µ swapped for a character no font has: the pixels must differ.
    monkeypatch.setattr(heatmap_render, "_um_label", lambda um, f: f"{um:g} {NO_GLYPH}m")
    boxed = scale_bar(panel, 1.0, text_px)
    assert not np.array_equal(np.asarray(drawn), np.asarray(boxed))


def test_without_the_truetype_font_labels_fall_back_to_um(monkeypatch):
    """If DejaVu Sans cannot be loaded, PIL's default font is used and µm is written as um."""
    monkeypatch.setattr(heatmap_render, "_truetype_path", lambda: None)
    font.cache_clear()
    try:
        f = font(14)
        assert heatmap_render._um_label(200, f) == "200 um"
        assert scale_bar(Image.new("RGB", (500, 300), "white"), 1.0).size == (500, 300)
    finally:
        font.cache_clear()


def test_percentile_scores():
    assert np.allclose(percentile_scores(np.array([0.1, 0.5, 0.2, 0.2])), [0, 1, 0.5, 0.5])
    assert np.allclose(percentile_scores(np.array([3.0])), [1.0])


@pytest.mark.parametrize("max_px", [160, 333, 700, 1500])
def test_heat_lands_on_the_planted_region_at_every_thumbnail_size(tmp_path, max_px):
    """Tiles fully inside the planted region, painted on the slide's own thumbnail, cover tumour pixels only."""
    s = write_slide(tmp_path / "s.tiff", 1390, 1010, mpp=0.5, seed=10, n_tumour=1)  # tumour left of centre
    ts = 32 * 0.55 / 0.5  # 35.2 level-0 px: fractional, and the slide is no multiple of it
    coords = grid_coords(s.width, s.height, ts)
    inside = (s.tumour_fraction(coords, ts) == 1.0).astype(float)
    assert 10 < inside.sum() < len(coords) / 4
    with open_slide(s.path) as slide:
        thumb = read_thumbnail(slide, s.path, max_px)
    raster = heat_raster(coords, inside, ts, (s.width, s.height), thumb.size)
    rgb = np.asarray(thumb).astype(int)
    tumour_coloured = rgb[..., 0] < 205  # lilac and dark-purple; the pink stroma is redder
    hot, cold = raster == 1.0, raster == 0.0
    assert tumour_coloured[hot].mean() > 0.97
    assert tumour_coloured[cold].mean() < 0.15
    # Centre-sampled ellipse at thumbnail scale, eroded by a tile: all hot.
    h, w = raster.shape
    yy, xx = (np.mgrid[0:h, 0:w] + 0.5) * [[[s.height / h]], [[s.width / w]]]
    core = s.tumour[0].radius(xx, yy) < 1 - 1.5 * ts / min(s.tumour[0].rx, s.tumour[0].ry)
    assert hot[core].all()
    # The overlay is pixel-aligned with the thumbnail: only covered pixels change.
    panel = np.asarray(overlay_panel(thumb, raster))
    changed = (panel != np.asarray(thumb)).any(-1)
    assert not changed[np.isnan(raster)].any() and changed[hot].mean() > 0.99


# ---------------------------------------------------------------- attention on the planted regions
def test_top_attention_tiles_fall_in_the_planted_regions(slides, abmil_run):
    cohort, root, _ = slides
    positive = [sid for sid, s in cohort.slides.items() if s.tumour]
    written = run_heatmap(abmil_run, [], positive, top_k=4, out_dir=root / "maps", max_px=640)
    assert {p.name for p in written} == {f"{s}_{kind}" for s in positive
                                        for kind in ("heatmap.png", "tiles.png", "scores.csv")}
    hits = []
    for sid in positive:
        scores = pd.read_csv(root / "maps" / f"{sid}_scores.csv")
        bag = root / "bags" / f"{sid}.h5"
        assert list(scores.columns) == ["x", "y", "score"]
        assert np.array_equal(scores[["x", "y"]].to_numpy(), read_coords(bag)) and (scores.score > 0).all()
        fraction = cohort.slides[sid].tumour_fraction(scores[["x", "y"]].to_numpy(), read_bag_info(bag).attrs["tile_size_level0"])
        top = np.argsort(-scores.score.to_numpy())[: max(1, round(0.05 * len(scores)))]
        hits += list(fraction[top] >= 0.5)
        with Image.open(root / "maps" / f"{sid}_heatmap.png") as im:
            assert 2 * 640 < im.width < 1700 and 500 < im.height < 1000  # thumbnail, overlay, header, colour bar
    assert np.mean(hits) >= 0.8, f"only {np.mean(hits):.0%} of the top-5% tiles lie in planted regions"


def test_patient_bag_attention_is_split_back_per_slide(slides, abmil_run, tmp_path):
    cohort, root, _ = slides
    slide_table = pd.read_csv(cohort.slide_csv, dtype=str)
    pid = slide_table.patient_id.value_counts().idxmax()
    sids = slide_table.slide_id[slide_table.patient_id == pid].tolist()
    assert len(sids) == 2
    run_heatmap(abmil_run, [], sids, out_dir=tmp_path)
    parts = [pd.read_csv(tmp_path / f"{s}_scores.csv").score for s in sids]
    assert [len(p) for p in parts] == [read_bag_info(root / "bags" / f"{s}.h5").n_tiles for s in sids]
    # Softmax attention over the patient's concatenated slides, averaged over folds: sums to 1 in all.
    assert sum(p.sum() for p in parts) == pytest.approx(1.0, abs=1e-4)


def test_without_the_slide_file_a_scatter_is_drawn(slides, abmil_run, tmp_path):
    cohort = slides[0]
    table = pd.read_csv(cohort.slide_csv).drop(columns="path")
    table.to_csv(tmp_path / "slides.csv", index=False)
    (tmp_path / "empty").mkdir()
    sid = next(s for s, v in cohort.slides.items() if v.tumour)
    written = run_heatmap(abmil_run, [f"cohort.slide_csv={tmp_path / 'slides.csv'}", f"slides.dir={tmp_path / 'empty'}"],
                          [sid], out_dir=tmp_path / "out")
    assert [p.name for p in written] == [f"{sid}_scores.csv", f"{sid}_heatmap.png"]
    with Image.open(written[1]) as im:
        assert (np.asarray(im.convert("RGB")) == 255).all(-1).mean() > 0.3  # white where no tiles


def test_a_slide_file_of_another_size_is_refused(slides, abmil_run, tmp_path):
    cohort = slides[0]
    sid = next(iter(cohort.slides))
    other = write_slide(tmp_path / "other.tiff", 640, 480, seed=1)
    pd.DataFrame({"slide_id": [sid], "path": [str(other.path)]}).to_csv(tmp_path / "list.csv", index=False)
    with pytest.raises(HeatmapError, match=f"640x480 px but the bag .*{sid}.h5 was made from a"):
        run_heatmap(abmil_run, [f"slides.csv={tmp_path / 'list.csv'}"], [sid], out_dir=tmp_path / "out")


# ---------------------------------------------------------------- every model
def test_every_attention_model_draws_a_heatmap(slides, tmp_path):
    cohort, _, _ = slides
    names = attention_models()
    assert {"abmil", "gated_abmil", "clam_sb", "clam_mb", "dsmil", "transmil"} <= set(names)
    assert not {"mean_pool", "max_pool"} & set(names)
    sid = next(s for s, v in cohort.slides.items() if v.tumour)
    for name in names:
        run = quick_run(slides, name, tmp_path, "cohort.bag_level=slide")
        written = run_heatmap(run, [], [sid], top_k=2)
        heatmap = run / "heatmaps" / f"{sid}_heatmap.png"
        assert heatmap in written and heatmap.stat().st_size > 10_000, name
        scores = pd.read_csv(run / "heatmaps" / f"{sid}_scores.csv").score
        assert np.isfinite(scores).all() and scores.sum() == pytest.approx(1.0, abs=1e-3), name


def test_models_without_attention_are_refused(slides, tmp_path):
    cohort, _, _ = slides
    run = quick_run(slides, "mean_pool", tmp_path)
    with pytest.raises(HeatmapError, match="mean_pool.*no per-tile attention.*gated_abmil"):
        run_heatmap(run, [], [next(iter(cohort.slides))])


def test_unknown_slides_and_classes_are_named(slides, abmil_run):
    with pytest.raises(HeatmapError, match="NOPE-S9"):
        run_heatmap(abmil_run, [], ["NOPE-S9"])
    with pytest.raises(ConfigError, match="'MSI-L' is not one of the run's classes"):
        run_heatmap(abmil_run, [], [next(iter(slides[0].slides))], target_class="MSI-L")


class PerClass(torch.nn.Module):
    """Fixed logits and per-class attention rows, to check which row is chosen."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor([logits])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        n = x.shape[1]
        rows = torch.stack([torch.full((n,), float(c)) for c in range(self.logits.shape[1])])
        return MILOutput(self.logits, rows[None])


def test_per_class_maps_use_the_ensemble_prediction_or_the_named_class():
    x = torch.zeros(5, 3)
    att, probs, used = ensemble_attention([PerClass([0.0, 2.0]), PerClass([0.0, -1.0])], x)
    assert used == 1 and np.allclose(att, 1.0) and probs[1] > 0.5  # mean probability decides, not each fold
    att, _, used = ensemble_attention([PerClass([0.0, 2.0])], x, class_index=0)
    assert used == 0 and np.allclose(att, 0.0)
    att, _, used = ensemble_attention([PerClass([0.0, 2.0])], x, softmax=False)  # e.g. multi-output regression
    assert used is None and np.allclose(att, 0.5)


def test_output_dir_override_is_the_output_folder(slides, abmil_run, tmp_path):
    sid = next(iter(slides[0].slides))
    out = run_heatmap(abmil_run, [f"output_dir={tmp_path / 'o'}"], [sid])
    assert all(p.parent == tmp_path / "o" for p in out)
    shutil.rmtree(tmp_path / "o")


# ---------------------------------------------------------------- whole cohorts, QuPath export, scales
def test_qupath_geojson_structure_and_tile_boxes(slides, abmil_run, tmp_path):
    """What QuPath's GeoJSON importer reads: a FeatureCollection of detection Polygons in level-0 pixels,
    each the closed box of its tile; the level-0 pixels inside a box are the pixels the encoder embedded."""
    import json

    from encoders.tiling import plan_tiles, read_tile

    cohort = slides[0]
    sid = next(s for s, v in cohort.slides.items() if v.tumour)
    written = run_heatmap(abmil_run, [], [sid], out_dir=tmp_path, formats=["geojson"])
    assert [p.name for p in written] == [f"{sid}_scores.csv", f"{sid}_tiles.geojson"]
    doc = json.loads((tmp_path / f"{sid}_tiles.geojson").read_text())
    bag = slides[1] / "bags" / f"{sid}.h5"
    coords, attrs = read_coords(bag), read_bag_info(bag).attrs
    scores = pd.read_csv(tmp_path / f"{sid}_scores.csv").score.to_numpy()
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    side = attrs["tile_px"] * attrs["mpp"] / attrs["slide_mpp"]  # level-0 px, from the extraction settings
    for f, (x, y), score in zip(doc["features"], coords, scores, strict=True):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert ring == [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["measurements"]["attention"] == pytest.approx(score, rel=1e-6)
        assert 0 <= props["measurements"]["attention percentile"] <= 100
    top = max(doc["features"], key=lambda f: f["properties"]["measurements"]["attention"])
    assert top["properties"]["measurements"]["attention percentile"] == 100
    # Pixels: the crop of a polygon's box equals the tile the encoder read; a box half a tile off does not.
    path = cohort.slides[sid].path
    with open_slide(path) as slide:
        plan = plan_tiles(attrs["slide_mpp"], attrs["mpp"], attrs["tile_px"], slide.level_downsamples)
        n = int(np.ceil(side))
        for f in doc["features"][:: max(1, len(coords) // 5)]:
            (x0, y0), (x1, y1) = f["geometry"]["coordinates"][0][0], f["geometry"]["coordinates"][0][2]
            seen = np.asarray(read_tile(slide, path, int(x0), int(y0), plan), float)
            box = slide.read_region((int(x0), int(y0)), 0, (n, n)).convert("RGB").resize(
                (attrs["tile_px"], attrs["tile_px"]), Image.Resampling.BICUBIC, box=(0, 0, x1 - x0, y1 - y0))
            assert np.abs(np.asarray(box, float) - seen).mean() < 2.0
            off = slide.read_region((int(x0 + side / 2), int(y0)), 0, (n, n)).convert("RGB")
            assert np.abs(np.asarray(off.resize(box.size), float) - seen).mean() > np.abs(np.asarray(box, float) - seen).mean()


def test_without_slide_ids_every_slide_of_the_cohort_is_drawn(slides, abmil_run, tmp_path):
    cohort = slides[0]
    written = run_heatmap(abmil_run, [], out_dir=tmp_path, formats=["geojson"])
    assert {p.name for p in written} == {f"{s}_{k}" for s in cohort.slides for k in ("scores.csv", "tiles.geojson")}


def test_top_draws_the_most_confident_bags(slides, abmil_run, tmp_path):
    from mil.predict import run_predict

    written = run_heatmap(abmil_run, [], out_dir=tmp_path, formats=["geojson"], top=2)
    drawn = {p.name.rsplit("_", 1)[0] for p in written}
    table = pd.read_csv(slides[0].slide_csv, dtype=str)
    patients = set(table.set_index("slide_id").loc[sorted(drawn), "patient_id"])
    # The same fold ensemble's probabilities, from `mil predict` on the cohort.
    pred = pd.read_csv(run_predict(abmil_run, [f"output_dir={tmp_path / 'pred'}"]) / "predictions.csv", dtype=str)
    prob = pred.astype({"prob_MSI-H": float}).set_index("patient_id")["prob_MSI-H"].sort_values()
    chosen = prob[sorted(patients)].sort_values()
    assert len(chosen) == 4  # ties allowed (an easy task saturates): compare values, not ids
    assert (chosen.iloc[:2] <= prob.iloc[1] + 1e-5).all() and (chosen.iloc[2:] >= prob.iloc[-2] - 1e-5).all()
    assert drawn == set(table.slide_id[table.patient_id.isin(patients)])  # every slide of those patients
    with pytest.raises(ConfigError, match="not both"):
        run_heatmap(abmil_run, [], [next(iter(slides[0].slides))], top=2)


def test_slide_list_file(tmp_path):
    from mil.commands.heatmap import read_slide_list

    (tmp_path / "a.txt").write_text("# review\nS1\n\nS2\n")
    (tmp_path / "b.csv").write_text("slide_id,note\nS3,x\nS4,y\n")
    assert read_slide_list(tmp_path / "a.txt") == ["S1", "S2"]
    assert read_slide_list(tmp_path / "b.csv") == ["S3", "S4"]
    with pytest.raises(ConfigError, match="no such file"):
        read_slide_list(tmp_path / "missing.txt")


def test_cohort_scale_keeps_a_diffuse_slide_cold(slides, abmil_run, tmp_path):
    from mil.attention import SlideAttention
    from mil.commands.heatmap import displayed_scores

    def sa(scores):
        scores = np.asarray(scores, float)
        return SlideAttention("s", None, None, np.zeros((len(scores), 2)), scores, {}, None, {}, len(scores))

    focused, diffuse = sa([0.01] * 9 + [0.91]), sa([0.1] * 10)
    by_slide = displayed_scores([focused, diffuse], "slide")
    by_cohort = displayed_scores([focused, diffuse], "cohort")
    assert by_slide[1].max() == pytest.approx(0.5)  # within its own slide a uniform map is mid-scale
    assert by_cohort[0].max() == pytest.approx(1.0) and by_cohort[1].max() == 0.0  # uniform: cold on the shared scale
    assert by_cohort[0][:9].max() == 0.0
    # End to end: the caption and colour bar say which scale.
    positive = [s for s, v in slides[0].slides.items() if v.tumour][:2]
    written = run_heatmap(abmil_run, [], positive, out_dir=tmp_path, scale="cohort", top_k=2, max_px=400, opacity=0.7)
    assert sum(p.name.endswith("_heatmap.png") for p in written) == 2
