"""Issue 12: the tables, split files, bags, slides and command lines researchers actually have.

Each test is one reported example of a kind (labels and ids, tables, slide and bag geometry,
command line); each failed on the code before the fix.
"""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mil.bags import IDENTITY_ATTRS, BagError, read_bag_info, read_coords, read_features, write_bag
from mil.cli import build_parser
from mil.cohort import CohortError, LabelColumn, load_cohort, read_table
from mil.config import Config, ConfigError, load_config
from mil.splits import load_splits


def _bag(folder, sid, n=5, dim=4):
    write_bag(folder / f"{sid}.h5", np.random.default_rng(len(sid)).standard_normal((n, dim)), attrs={"encoder": "enc"})


def _cohort_cfg(tmp_path, slides: pd.DataFrame | None, clinical: pd.DataFrame | None = None, **kw):
    cfg = OmegaConf.structured(Config).cohort
    if slides is not None:
        slides.to_csv(tmp_path / "slides.csv", index=False)
        cfg.slide_csv = str(tmp_path / "slides.csv")
    if clinical is not None:
        clinical.to_csv(tmp_path / "clinical.csv", index=False)
        cfg.clinical_csv = str(tmp_path / "clinical.csv")
    cfg.features_dir = str(tmp_path / "features")
    cfg.target = "label"
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# ---------------------------------------------------------------- labels and ids
def test_a_class_named_none_or_na_is_a_value_not_a_missing_label(tmp_path):
    labels = ["None", "Low", "High", "NA", "null", "None"]
    sids = [f"s{i}" for i in range(6)]
    for sid in sids:
        _bag(tmp_path / "features", sid)
    slides = pd.DataFrame({"patient_id": [f"P{i}" for i in range(6)], "slide_id": sids, "label": labels})
    cohort = load_cohort(_cohort_cfg(tmp_path, slides))
    assert cohort.classes == ["High", "Low", "NA", "None", "null"] and len(cohort.bags) == 6
    assert cohort.skipped.empty
    # Only an empty cell is a missing label.
    slides.loc[1, "label"] = ""
    cohort = load_cohort(_cohort_cfg(tmp_path, slides))
    assert cohort.skipped.set_index("id").loc["s1", "reason"] == "missing label label"


def test_numeric_columns_still_read_na_as_missing(tmp_path):
    for sid in ("a", "b", "c"):
        _bag(tmp_path / "features", sid)
    slides = pd.DataFrame({"patient_id": ["A", "B", "C"], "slide_id": ["a", "b", "c"], "TMB": ["3.5", "NA", "7"]})
    cohort = load_cohort(_cohort_cfg(tmp_path, slides), columns=[LabelColumn("TMB", "number")])
    assert [b.labels["TMB"] for b in cohort.bags] == ["3.5", "7"]
    assert "missing TMB label" in cohort.skipped.reason.tolist()


@pytest.mark.parametrize("classes", ["[no, yes]", "[off, on]", "[false, true]"])
def test_yaml_boolean_class_names_are_refused_with_quote_them(tmp_path, classes):
    (tmp_path / "c.yaml").write_text(f"cohort:\n  target: response\n  classes: {classes}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: cohort.classes item 0 is the YAML boolean False.*quote the names"):
        load_config([str(tmp_path / "c.yaml")])
    (tmp_path / "q.yaml").write_text("cohort:\n  classes: ['no', 'yes']\n")
    assert list(load_config([str(tmp_path / "q.yaml")]).cohort.classes) == ["no", "yes"]
    with pytest.raises(ConfigError, match=r"task.targets\[0\].classes item 0 is the YAML boolean"):
        load_config([f"task.targets=[{{column: BRAF, classes: {classes}}}]"])


def test_split_file_with_unquoted_zero_padded_ids_keeps_them_exactly(tmp_path):
    # A hand-edited / exported split file: YAML 1.1 would read 000 as 0 and 010 as 8 (octal).
    (tmp_path / "splits.yaml").write_text(
        "- name: fold_0\n  train: [000, 010, 0012]\n  val: [007]\n  test: [1e3, 'x']\n"
        "- name: fold_1\n  train:\n  - 1e3\n  - 007\n  - x\n  val: [000]\n  test: [010, 0012]\n"
    )
    known = {"000", "010", "0012", "007", "1e3", "x"}
    folds = load_splits(tmp_path / "splits.yaml", known)
    assert folds[0].train == ["000", "010", "0012"] and folds[0].val == ["007"] and folds[0].test == ["1e3", "x"]
    assert folds[1].train == ["1e3", "007", "x"] and folds[1].fold == 1


def test_ids_that_lost_their_leading_zeros_are_named_with_examples(tmp_path):
    for i in range(3):
        _bag(tmp_path / "features", f"S{i}")
    clinical = pd.DataFrame({"patient_id": ["00007", "00012", "00100"], "label": ["a", "b", "a"]})
    slides = pd.DataFrame({"patient_id": ["7", "12", "100"], "slide_id": ["S0", "S1", "S2"]})
    with pytest.raises(CohortError) as e:
        load_cohort(_cohort_cfg(tmp_path, slides, clinical))
    message = str(e.value)
    assert "patient ids do not match between the tables: 3 of the 3 patients in" in message
    assert "differ only in leading zeros" in message and "'7' vs '00007'" in message
    assert "has a bag" not in message


def test_a_few_ids_that_lost_their_leading_zeros_are_an_error_too(tmp_path, caplog):
    for i in range(3):
        _bag(tmp_path / "features", f"S{i}")
    clinical = pd.DataFrame({"patient_id": ["00007", "00012", "00100"], "label": ["a", "b", "a"]})
    slides = pd.DataFrame({"patient_id": ["00007", "12", "00100"], "slide_id": ["S0", "S1", "S2"]})  # one edited by hand
    with pytest.raises(CohortError, match=r"1 of the 3 patients in .*differ only in leading zeros.*'12' vs '00012'"):
        load_cohort(_cohort_cfg(tmp_path, slides, clinical))
    other = slides.assign(patient_id=["00007", "99999", "00100"])  # an id that matches nothing: skipped, with a warning
    with caplog.at_level(logging.WARNING, logger="mil.cohort"):
        cohort = load_cohort(_cohort_cfg(tmp_path, other, clinical))
    assert len(cohort.bags) == 2 and "their slides are skipped" in caplog.text


def test_slide_ids_written_with_the_file_extension_match_their_bags(tmp_path, caplog):
    for sid in ("PAT-000-DX1", "PAT-001-DX1"):
        _bag(tmp_path / "features", sid)
    slides = pd.DataFrame({"patient_id": ["PAT-000", "PAT-001"], "slide_id": ["PAT-000-DX1.svs", "PAT-001-DX1.h5"],
                           "label": ["a", "b"]})
    with caplog.at_level(logging.INFO, logger="mil.cohort"):
        cohort = load_cohort(_cohort_cfg(tmp_path, slides))
    assert [b.slide_ids for b in cohort.bags] == [["PAT-000-DX1"], ["PAT-001-DX1"]]
    assert "matched the bag of their stem (e.g. PAT-000-DX1.svs -> PAT-000-DX1.h5)" in caplog.text
    slides.loc[0, "slide_id"] = "PAT-009-DX1.svs"  # no bag for either name: both names looked for are said
    cohort = load_cohort(_cohort_cfg(tmp_path, slides))
    assert "no bag PAT-009-DX1.svs.h5 or PAT-009-DX1.h5" in cohort.skipped.set_index("id").loc["PAT-009-DX1.svs", "reason"]


def test_misspelled_slide_ids_list_lost_patients_and_suggest_unused_bags(tmp_path, caplog):
    for sid in ("TCGA-AA-0001-DX1", "TCGA-AA-0002-DX1", "TCGA-AA-0003-DX1", "OTHER-COHORT-1"):
        _bag(tmp_path / "features", sid)
    slides = pd.DataFrame({"patient_id": ["P1", "P2", "P3"],
                           "slide_id": ["TCGA-AA-0001-DX1", "TCGA-AA-002-DX1", "TCGA-AA-0003-DX1"],
                           "label": ["a", "b", "a"]})
    with caplog.at_level(logging.INFO, logger="mil.cohort"):
        cohort = load_cohort(_cohort_cfg(tmp_path, slides))
    reasons = cohort.skipped.set_index("id").reason
    assert reasons["TCGA-AA-002-DX1"].endswith("closest unused bag: TCGA-AA-0002-DX1.h5")
    assert reasons["P2"] == "all 1 slide(s) skipped: no bag TCGA-AA-002-DX1.h5"
    assert "2 bag(s) in" in caplog.text and "are not in the slide table" in caplog.text


def test_skip_summary_counts_each_reason_readably(tmp_path, caplog):
    for i in range(4):
        _bag(tmp_path / "features", f"s{i}")
    clinical = pd.DataFrame({"patient_id": [f"P{i}" for i in range(4)] + ["Q"], "label": ["a", "b", "a", "b", "a"]})
    slides = pd.DataFrame({"patient_id": [f"P{i}" for i in range(4)] + ["X1", "X2"],
                           "slide_id": [f"s{i}" for i in range(4)] + ["x1", "x2"]})
    with caplog.at_level(logging.WARNING, logger="mil.cohort"):
        load_cohort(_cohort_cfg(tmp_path, slides, clinical))
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped"))
    assert "2 slides of patients not in the clinical table (e.g. x1, x2)" in summary
    assert "1 patients without slides (e.g. Q)" in summary and "skipped.csv" in summary


def test_predict_with_a_label_outside_the_trained_classes_predicts_every_bag(predict_run, synthetic_cohort, tmp_path):
    from mil.predict import run_predict

    clinical = pd.read_csv(synthetic_cohort.clinical_csv, dtype=str)
    clinical.loc[0, "MSI"] = "MSI-L"
    clinical.to_csv(tmp_path / "external.csv", index=False)
    c = synthetic_cohort
    out = run_predict(predict_run, [f"cohort.clinical_csv={tmp_path / 'external.csv'}", f"cohort.slide_csv={c.slide_csv}",
                                    f"cohort.features_dir={c.features_dir}", f"output_dir={tmp_path / 'ext'}"])
    pred = pd.read_csv(out / "predictions.csv", dtype=str)
    assert len(pred) == len(clinical)
    assert pred.set_index("patient_id").loc[clinical.patient_id[0], "MSI"] != "MSI-L"  # left out of the metrics
    assert (out / "metrics.json").is_file()
    assert OmegaConf.load(out / "run.yaml").labels_outside_classes.MSI["MSI-L"] == 1


def test_report_reads_back_a_class_named_none(tmp_path):
    from mil.report import report_predictions

    rng = np.random.default_rng(0)
    p = rng.random(40)
    df = pd.DataFrame({"patient_id": [f"P{i}" for i in range(40)], "grade": np.where(p > 0.5, "High", "None"),
                       "prob_None": 1 - p, "prob_High": p})
    df.to_csv(tmp_path / "predictions.csv", index=False)
    out = report_predictions(tmp_path / "predictions.csv", target="grade", classes=["None", "High"])
    assert json.loads((out / "metrics.json").read_text())["pooled"]["n"]["value"] == 40  # "None" rows included


def test_report_on_another_tools_predictions_names_the_columns_it_needs(tmp_path):
    from mil.report import report_predictions

    pd.DataFrame({"patient_id": ["P0", "P1"], "label": [0, 1], "score": [0.2, 0.9]}).to_csv(tmp_path / "other.csv",
                                                                                          index=False)
    with pytest.raises(ValueError, match=r"other.csv has no prob_<class> columns and no pred_label column.*"
                                         r"columns are \['patient_id', 'label', 'score'\]"):
        report_predictions(tmp_path / "other.csv", target="label")


def test_config_keys_are_suggested_by_last_segment_and_synonyms():
    for item, expected in [("train.learning_rate=1e-3", "train.lr"), ("train.epochs=3", "train.max_epochs"),
                           ("epochs=3", "train.max_epochs"), ("trainer.max_epochs=3", "train.max_epochs"),
                           ("cohort.label=MSI", "cohort.target"), ("train.lrr=1", "train.lr")]:
        with pytest.raises(ConfigError, match=rf"did you mean '{expected}'\?"):
            load_config([item])


# ---------------------------------------------------------------- tables
def _write(df: pd.DataFrame, path, sep=",", bom=False):
    text = df.to_csv(index=False, sep=sep)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.mark.parametrize(("name", "sep", "bom"), [("semi.csv", ";", True), ("tab.csv", "\t", False),
                                                  ("t.tsv", "\t", False), ("pipe.txt", "|", False)])
def test_separators_are_sniffed(tmp_path, name, sep, bom):
    df = pd.DataFrame({"patient_id": ["007", "008"], "slide_id": ["a", "b"], "score": ["1,5", "2,5"]})
    got = read_table(_write(df, tmp_path / name, sep, bom), ["patient_id", "slide_id"], "slide table")
    assert got.columns.tolist() == ["patient_id", "slide_id", "score"]
    assert got.patient_id.tolist() == ["007", "008"] and got.score.tolist() == ["1,5", "2,5"]


def test_excel_workbook_with_ids_as_text_and_a_none_class(tmp_path):
    df = pd.DataFrame({"case_id": ["00007", "00012"], "slide_id": ["s1", "s2"], "label": ["None", "High"]})
    df.to_excel(tmp_path / "cohort.xlsx", index=False)
    for sid in ("s1", "s2"):
        _bag(tmp_path / "features", sid)
    cfg = _cohort_cfg(tmp_path, None)
    cfg.slide_csv = str(tmp_path / "cohort.xlsx")  # CLAM's case_id is read as the patient column
    cohort = load_cohort(cfg)
    assert [(b.patient_id, b.label) for b in cohort.bags] == [("00007", "None"), ("00012", "High")]


def test_one_clam_style_table_needs_no_clinical_csv_null(tmp_path):
    for sid in ("a1", "a2", "b1", "c1"):
        _bag(tmp_path / "features", sid)
    table = pd.DataFrame({"case_id": ["A", "A", "B", "C"], "slide_id": ["a1", "a2", "b1", "c1"],
                          "label": ["tumor", "tumor", "normal", "normal"]})
    table.to_csv(tmp_path / "clam.csv", index=False)
    cfg = _cohort_cfg(tmp_path, None)
    cfg.clinical_csv = str(tmp_path / "clam.csv")  # the only table, given as the clinical table
    assert [b.bag_id for b in load_cohort(cfg).bags] == ["A", "B", "C"]
    cfg.slide_csv = str(tmp_path / "clam.csv")  # or as both
    assert [b.slide_ids for b in load_cohort(cfg).bags] == [["a1", "a2"], ["b1"], ["c1"]]


def test_relative_paths_name_the_directory_they_were_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cohort_cfg(tmp_path, None)
    cfg.slide_csv = "data/slides.csv"
    with pytest.raises(CohortError, match=rf"data/slides.csv \(relative to the working directory {tmp_path}\) does not exist"):
        load_cohort(cfg)
    from mil.splits import SplitError

    with pytest.raises(SplitError, match=r"relative to the working directory"):
        load_splits("splits.yaml", set())


# ---------------------------------------------------------------- bag geometry
def _stamp_bag(path, coords_um, tile_size_um=112.0, unit="um", attrs=None):
    with h5py.File(path, "w") as f:
        f["feats"] = np.ones((len(coords_um), 4), dtype=np.float16)
        f["coords"] = np.asarray(coords_um, dtype=np.float32)
        if unit is not None:
            f.attrs["unit"] = unit
        f.attrs["tile_size_um"] = tile_size_um
        f.attrs["tile_size_px"] = 224
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def test_stamp_micrometre_coordinates_become_level0_pixels_or_are_refused(tmp_path):
    path = tmp_path / "stamp.h5"
    _stamp_bag(path, [[0.0, 0.0], [112.0, 0.0], [224.0, 112.0]])
    np.testing.assert_array_equal(read_coords(path, slide_mpp=0.25), [[0, 0], [448, 0], [896, 448]])
    with pytest.raises(BagError, match=r"stamp.h5: tile coordinates are in micrometres .*slides.mpp"):
        read_coords(path)
    _stamp_bag(path, [[0.0, 0.0]], attrs={"slide_mpp": 0.5})  # a recorded slide mpp is enough
    np.testing.assert_array_equal(read_coords(path), [[0, 0]])
    _stamp_bag(path, [[0.0, 0.0]], unit=None)
    with pytest.raises(BagError, match=r"no 'unit' attribute, so their scale .* cannot be established"):
        read_coords(path, slide_mpp=0.25)
    _stamp_bag(path, [[0.0, 0.0]], unit="mm")
    with pytest.raises(BagError, match=r"unit 'mm'"):
        read_coords(path, slide_mpp=0.25)


def test_stamp_bag_heatmap_scores_are_in_level0_pixels(predict_run, synthetic_cohort, tmp_path):
    from mil.commands.heatmap import run_heatmap

    c = synthetic_cohort
    slides = pd.read_csv(c.slide_csv, dtype=str)
    sid = slides.slide_id[0]
    stamp_dir = tmp_path / "stamp"
    stamp_dir.mkdir()
    identity = {k: v for k, v in read_bag_info(c.features_dir / f"{sid}.h5").attrs.items()
                if k in IDENTITY_ATTRS}
    for s in slides.slide_id:  # the same features, as STAMP writes them: µm coordinates on a 112 µm grid
        x = read_features(c.features_dir / f"{s}.h5")
        grid = np.stack([np.arange(len(x)) % 8, np.arange(len(x)) // 8], axis=1) * 112.0
        with h5py.File(stamp_dir / f"{s}.h5", "w") as f:
            f["feats"], f["coords"] = x, grid
            f.attrs.update({"unit": "um", "tile_size_um": 112.0, "tile_size_px": 224, **identity})
    keys = [f"cohort.features_dir={stamp_dir}", f"cohort.slide_csv={c.slide_csv}", f"cohort.clinical_csv={c.clinical_csv}"]
    with pytest.raises(ValueError, match=r"micrometres"):
        run_heatmap(predict_run, keys, [sid], out_dir=tmp_path / "hm0")
    run_heatmap(predict_run, [*keys, "slides.mpp=0.25"], [sid], out_dir=tmp_path / "hm")
    scores = pd.read_csv(tmp_path / "hm" / f"{sid}_scores.csv")
    n = len(scores)
    expected = np.stack([np.arange(n) % 8, np.arange(n) // 8], axis=1) * 448  # 112 µm / 0.25 µm per px
    np.testing.assert_array_equal(scores[["x", "y"]].to_numpy(), expected)


def test_an_empty_bag_is_a_skip_not_a_stop(tmp_path):
    for sid in ("a", "b"):
        _bag(tmp_path / "features", sid)
    with h5py.File(tmp_path / "features" / "c.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((0, 4), dtype=np.float32))
    slides = pd.DataFrame({"patient_id": ["A", "B", "C"], "slide_id": ["a", "b", "c"], "label": ["x", "y", "x"]})
    cohort = load_cohort(_cohort_cfg(tmp_path, slides))
    assert [b.bag_id for b in cohort.bags] == ["A", "B"]
    reasons = cohort.skipped.set_index("id").reason
    assert reasons["c"] == "empty bag c.h5 (0 tiles)" and reasons["C"].startswith("all 1 slide(s) skipped: empty bag")


# ---------------------------------------------------------------- slide geometry: non-square pixels
def _anisotropic_tiff(path, mpp_x, mpp_y, size=(1600, 800), blank_left: int = 0):
    """Sinusoidal stripes with a 40 µm period in x and in y, on a slide with non-square pixels
    (the first ``blank_left`` columns white glass, so tissue detection has a background)."""
    import tifffile
    from PIL import Image

    w, h = size
    x, y = np.meshgrid(np.arange(w) * mpp_x, np.arange(h) * mpp_y)
    green = 128 + 60 * np.cos(2 * np.pi * x / 40) + 60 * np.cos(2 * np.pi * y / 40)
    rgb = np.stack([np.full_like(green, 200), green, np.full_like(green, 200)], axis=-1).astype(np.uint8)
    rgb[:, :blank_left] = 255
    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tw:
        for level in range(2):
            res = (1e4 / (mpp_x * 2**level), 1e4 / (mpp_y * 2**level))
            tw.write(np.asarray(img), tile=(256, 256), photometric="rgb", compression="zlib",
                     subfiletype=0 if level == 0 else 1, resolution=res, resolutionunit="CENTIMETER")
            img = img.reduce(2)
    return path


def _period(profile):
    spectrum = np.abs(np.fft.rfft(profile - profile.mean(), n=8192))
    return 8192 / np.argmax(spectrum)


def test_non_square_pixels_are_tiled_with_true_square_tiles(tmp_path):
    from encoders.slides import SlideError, SlideRef, open_slide, resolve_mpp_xy
    from encoders.tiling import grid_coords, plan_tiles, read_tile

    path = _anisotropic_tiff(tmp_path / "aniso.tiff", 0.25, 0.5)
    with open_slide(path) as slide:
        mx, my, source = resolve_mpp_xy(slide, SlideRef("aniso", path), None)
        assert (mx, my, source) == (pytest.approx(0.25), pytest.approx(0.5), "metadata")
        plan = plan_tiles(mx, 0.5, 224, slide.level_downsamples, my)
        tile = np.asarray(read_tile(slide, path, 0, 0, plan)).astype(float)
    # 224 px at 0.5 µm = 112 µm: 448 level-0 px wide, 224 high; not a 298 px square at the mean mpp.
    assert (plan.tile_size_level0, plan.tile_size_level0_y) == (pytest.approx(448), pytest.approx(224))
    assert plan.geometry_attrs() == {"tile_size_level0_x": 448, "tile_size_level0_y": 224,
                                     "slide_mpp_x": 0.25, "slide_mpp_y": 0.5}
    coords = grid_coords(1600, 800, plan.tile_size_level0, plan.tile_size_level0_y)
    assert np.unique(coords[:, 0]).tolist() == [0, 448, 896] and np.unique(coords[:, 1]).tolist() == [0, 224, 448]
    assert tile.shape == (224, 224, 3)
    # 40 µm stripes are 80 px apart in a 0.5 µm tile, in both directions.
    assert _period(tile[:, :, 1].mean(axis=0)) == pytest.approx(80, rel=0.05)
    assert _period(tile[:, :, 1].mean(axis=1)) == pytest.approx(80, rel=0.05)
    # Pixels more than 4x from square are metadata errors: refused, naming the slide.
    bad = _anisotropic_tiff(tmp_path / "bad.tiff", 0.25, 1.5, size=(600, 300))
    with open_slide(bad) as slide, pytest.raises(SlideError, match=r"bad.tiff: slide 'bad' has pixels 0.25 x 1.5"):
        resolve_mpp_xy(slide, SlideRef("bad", bad), None)


def test_extracted_bag_of_a_non_square_slide_records_both_true_sizes(tmp_path):
    from encoders.extract import run_extract

    (tmp_path / "slides").mkdir()
    _anisotropic_tiff(tmp_path / "slides" / "aniso.tiff", 0.25, 0.5, blank_left=512)
    run_extract(load_config([f"slides.dir={tmp_path / 'slides'}", f"features_dir={tmp_path / 'bags'}",
                             "encoder.name=random-vit-tiny", "encoder.device=cpu", "loader.workers=0",
                             "tiling.tile_px=32", "tiling.mpp=4.0", "tiling.min_tissue=0", "tiling.thumbnail_px=256"]))
    attrs = read_bag_info(tmp_path / "bags" / "aniso.h5").attrs
    assert attrs["tile_size_level0_x"] == pytest.approx(512) and attrs["tile_size_level0_y"] == pytest.approx(256)
    assert "tile_size_level0" not in attrs and "slide_mpp" not in attrs  # no single size is true
    coords = read_coords(tmp_path / "bags" / "aniso.h5")
    assert set(coords[:, 0]) == {512, 1024} and set(coords[:, 1]) == {0, 256, 512}  # tissue right of the glass


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("argv", [
    ["heatmap", "RUN", "cfg.yaml", "--slide", "X", "output_dir=/tmp/hm"],
    ["heatmap", "RUN", "--slide", "X", "cfg.yaml", "--top-k", "3", "output_dir=/tmp/hm"],
    ["extract", "cfg.yaml", "--shard", "0/2", "output_dir=/tmp/hm"],
    ["predict", "RUN", "cfg.yaml", "output_dir=/tmp/hm"],
])
def test_overrides_are_accepted_before_and_after_options(argv):
    args = build_parser().parse_args(argv)
    assert args.config[-1] == "output_dir=/tmp/hm" and ("cfg.yaml" in args.config or argv[0] == "predict")


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory, synthetic_cohort):
    """A one-epoch gated-ABMIL `mil train` run on the shared synthetic cohort."""
    from mil.crossval import run_train

    c = synthetic_cohort
    return run_train(load_config([
        f"cohort.clinical_csv={c.clinical_csv}", f"cohort.slide_csv={c.slide_csv}", f"cohort.features_dir={c.features_dir}",
        "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]", "model.name=gated_abmil", "model.args={hidden_dim: 16}",
        "train.max_epochs=1", "train.min_epochs=1", "train.min_steps=0", "train.refit=false", "train.batch_size=4", "train.precision=32-true",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
        f"output_dir={tmp_path_factory.mktemp('i12') / 'run'}"]))

