"""The HDF5 bag format: our writer, foreign bags (CLAM, TRIDENT, STAMP) and broken files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mil.bags import BagError, read_bag_info, read_coords, read_features, write_bag


def test_write_read_roundtrip(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    coords = np.arange(14).reshape(7, 2) * 224
    path = write_bag(tmp_path / "s1.h5", x, coords, {"encoder": "virchow2", "embedding": "cls+mean", "mpp": 0.5})
    info = read_bag_info(path)
    assert (info.n_tiles, info.dim, info.dtype, info.has_coords) == (7, 5, "float16", True)
    assert info.attrs["encoder"] == "virchow2" and info.attrs["mpp"] == 0.5
    assert info.identity == {"encoder": "virchow2", "encoder_weights": "unknown", "embedding": "cls+mean",
                             "mpp": "0.5", "tile_px": "unknown"}
    np.testing.assert_allclose(read_features(path), x, atol=1e-2)
    np.testing.assert_array_equal(read_coords(path), coords)
    assert not list(tmp_path.glob("*.tmp*")), "temporary file left behind"


def test_write_is_atomic_on_failure(tmp_path):
    with pytest.raises(BagError, match="NaN"):
        write_bag(tmp_path / "bad.h5", np.full((3, 4), np.nan))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("layout", "key"),
    [("clam", "features"), ("trident", "features"), ("stamp", "feats"), ("clam_3d", "features")],
)
def test_foreign_bags_load(tmp_path, layout, key):
    x = np.random.default_rng(1).standard_normal((9, 6)).astype(np.float32)
    path = tmp_path / f"{layout}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=x[None] if layout == "clam_3d" else x)
        if layout != "trident":  # coords may be absent
            f.create_dataset("coords", data=np.zeros((9, 2), dtype=np.int32))
        if layout == "stamp":  # STAMP >= 2 stores µm coordinates and says so
            f.attrs["unit"] = "um"
    info = read_bag_info(path)
    assert (info.n_tiles, info.dim, info.feature_key) == (9, 6, key)
    assert info.identity["encoder"] == "unknown"
    np.testing.assert_allclose(read_features(path), x)
    assert (read_coords(path, slide_mpp=0.5) is None) == (layout == "trident")


def test_broken_files_are_named(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "text.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "nokey.h5", "w") as f:
        f.create_dataset("embeddings", data=np.zeros((2, 2)))
    with h5py.File(tmp_path / "zero.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((0, 4), dtype=np.float32))
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f.create_dataset("features", data=np.array([[1.0, np.inf], [0.0, 1.0]], dtype=np.float32))
    for name, message in [
        ("empty.h5", "not a readable HDF5"),
        ("text.h5", "not a readable HDF5"),
        ("nokey.h5", "no feature dataset"),
        ("zero.h5", "empty"),
        ("missing.h5", "does not exist"),
    ]:
        with pytest.raises(BagError, match=message) as err:
            read_bag_info(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(BagError, match=r"nan\.h5: features contain NaN or inf in 1 tile"):
        read_features(tmp_path / "nan.h5")


def test_float16_overflow_keeps_float32_and_names_the_bag(tmp_path, caplog):
    x = np.ones((4, 3), np.float32)
    x[1, 2] = 70000.0  # > 65504, the largest float16
    with caplog.at_level("WARNING", logger="mil.bags"):
        path = write_bag(tmp_path / "slide7.h5", x)
    assert "slide7.h5: features up to 7e+04 overflow float16; keeping float32" in caplog.text
    assert read_bag_info(path).dtype == "float32"
    np.testing.assert_array_equal(read_features(path), x)  # finite, exact: nothing found later in training
    assert read_bag_info(write_bag(tmp_path / "ok.h5", np.ones((2, 3)))).dtype == "float16"


def test_nonfinite_tiles_are_counted_in_chunks(tmp_path):
    from mil.bags import count_nonfinite_tiles

    x = np.zeros((25, 3), np.float32)
    x[[0, 9, 24], 1] = [np.nan, np.inf, -np.inf]
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f.create_dataset("features", data=x)
    assert [count_nonfinite_tiles(tmp_path / "b.h5", chunk_rows=k) for k in (1, 4, 100)] == [3, 3, 3]
