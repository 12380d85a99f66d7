"""Patient-level stratified splits: disjoint, reproducible, reusable from splits.yaml."""

from __future__ import annotations

import numpy as np
import pytest

from mil.splits import SplitError, load_splits, make_splits, save_splits


def _cohort(n=40, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.array([f"P{i:03d}" for i in range(n) for _ in range(rng.integers(1, 4))])  # 1-3 bags each
    per_patient = {p: int(rng.random() < 0.35) for p in np.unique(patients)}
    return patients, np.array([per_patient[p] for p in patients])


def test_folds_are_disjoint_and_cover_every_patient():
    patients, labels = _cohort()
    folds = make_splits(patients, labels, ["neg", "pos"], folds=5, repeats=2, seed=1)
    assert len(folds) == 10
    for r in (0, 1):
        tests = [set(f.test) for f in folds if f.repeat == r]
        assert set().union(*tests) == set(patients)
        assert sum(len(t) for t in tests) == len(set(patients))
    for f in folds:
        train, val, test = set(f.train), set(f.val), set(f.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(patients)
        assert val, "inner validation split is empty"
        pos = {p for p, y in zip(patients, labels, strict=True) if y}
        assert pos & set(f.test) and pos & val and pos & train  # stratified: positives everywhere


def test_same_seed_same_splits_other_seed_other_splits():
    patients, labels = _cohort()
    a = make_splits(patients, labels, ["n", "p"], folds=4, seed=7)
    b = make_splits(patients, labels, ["n", "p"], folds=4, seed=7)
    c = make_splits(patients, labels, ["n", "p"], folds=4, seed=8)
    assert a == b and a != c


def test_too_few_patients_per_class():
    patients = np.array(["a", "b", "c", "d", "e", "f"])
    labels = np.array([0, 0, 0, 0, 1, 1])
    with pytest.raises(SplitError, match=r"at least 3 patients of every class, but has neg: 4, pos: 2 \(too few: pos\)"):
        make_splits(patients, labels, ["neg", "pos"], folds=3)


def test_split_file_roundtrip(tmp_path):
    patients, labels = _cohort()
    folds = make_splits(patients, labels, ["n", "p"], folds=3, seed=0)
    save_splits(folds, tmp_path / "splits.yaml")
    assert load_splits(tmp_path / "splits.yaml", set(patients)) == folds
    # Patients the cohort lacks are dropped, not invented.
    reduced = set(patients) - {folds[0].test[0]}
    assert folds[0].test[0] not in load_splits(tmp_path / "splits.yaml", reduced)[0].test


def test_bad_split_file(tmp_path):
    (tmp_path / "s.yaml").write_text("- {train: [a], val: [b], test: [a]}\n")
    with pytest.raises(SplitError, match="fold 0 has patients in two of train/val/test"):
        load_splits(tmp_path / "s.yaml", {"a", "b"})
    (tmp_path / "t.yaml").write_text("- {train: [a], test: [c]}\n")
    with pytest.raises(SplitError, match="fold 0 has no val list"):
        load_splits(tmp_path / "t.yaml", {"a"})
