"""Cohort tables: the bad-input catalogue (skips are counted and listed, errors name the row)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mil.bags import write_bag
from mil.cohort import CohortError, load_cohort
from mil.config import Config


def _bag(dir, sid, dim=4, n=5, encoder="enc"):
    write_bag(dir / f"{sid}.h5", np.ones((n, dim)), attrs={"encoder": encoder})


@pytest.fixture
def tables(tmp_path):
    feats = tmp_path / "features"
    for sid in ["a1", "a2", "b1", "c1", "d1"]:
        _bag(feats, sid)
    clinical = pd.DataFrame({"patient_id": ["A", "B", "C", "D", "E"], "MSI": ["MSI-H", "MSS", "MSS", None, "MSS"]})
    slides = pd.DataFrame({"patient_id": ["A", "A", "B", "C", "D", "F"], "slide_id": ["a1", "a2", "b1", "c1", "d1", "f1"]})
    return tmp_path, clinical, slides


def _cfg(tmp_path, clinical, slides, **kw):
    if clinical is not None:
        clinical.to_csv(tmp_path / "clinical.csv", index=False)
    slides.to_csv(tmp_path / "slides.csv", index=False)
    cfg = OmegaConf.structured(Config).cohort
    cfg.clinical_csv = str(tmp_path / "clinical.csv") if clinical is not None else None
    cfg.slide_csv = str(tmp_path / "slides.csv")
    cfg.features_dir = str(tmp_path / "features")
    cfg.target = "MSI"
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_patient_bags_and_skips(tables):
    tmp, clinical, slides = tables
    cohort = load_cohort(_cfg(tmp, clinical, slides))
    assert [b.bag_id for b in cohort.bags] == ["A", "B", "C"]
    assert cohort.bags[0].slide_ids == ["a1", "a2"] and cohort.bags[0].n_tiles == 10
    assert cohort.classes == ["MSI-H", "MSS"]  # sorted when cohort.classes is unset
    reasons = dict(zip(cohort.skipped.id, cohort.skipped.reason, strict=True))
    assert reasons["E"] == "no slides in the slide table"
    assert reasons["f1"] == "patient not in the clinical table"
    assert reasons["d1"] == "missing MSI label"
    assert reasons["D"] == "all 1 slide(s) skipped: missing MSI label"  # the patient who lost every slide
    assert len(cohort.skipped) == 4


def test_slide_level_bags_and_missing_bag(tables):
    tmp, clinical, slides = tables
    slides = pd.concat([slides, pd.DataFrame({"patient_id": ["C"], "slide_id": ["c2"]})])
    cohort = load_cohort(_cfg(tmp, clinical, slides, bag_level="slide", classes=["MSS", "MSI-H"]))
    assert [b.bag_id for b in cohort.bags] == ["a1", "a2", "b1", "c1"]
    assert cohort.labels.tolist() == [1, 1, 0, 0]
    assert "no bag c2.h5" in cohort.skipped.set_index("id").loc["c2", "reason"]


def test_slide_table_labels(tables):
    tmp, _, slides = tables
    slides = slides.iloc[:4].assign(tumor=["yes", "no", "no", "yes"])
    cohort = load_cohort(_cfg(tmp, None, slides, target="tumor", bag_level="slide"))
    assert [b.label for b in cohort.bags] == ["yes", "no", "no", "yes"]
    with pytest.raises(CohortError, match="patient 'A' has slides with different tumor labels"):
        load_cohort(_cfg(tmp, None, slides, target="tumor", bag_level="patient"))


def test_labels_that_the_two_tables_disagree_on_are_all_named(tables):
    tmp, clinical, slides = tables
    agree = slides.assign(MSI=["MSI-H", "MSI-H", "MSS", " MSS", None, "MSS"])  # spaces and empty cells: no conflict
    assert len(load_cohort(_cfg(tmp, clinical, agree)).bags) == 3
    flipped = slides.assign(MSI=["MSS", "MSI-H", "MSI-H", "MSS", None, "MSS"])  # A's first slide and B disagree
    with pytest.raises(CohortError, match=r"disagree on 2 slide row\(s\)") as e:
        load_cohort(_cfg(tmp, clinical, flipped))
    message = str(e.value)
    assert "row 2 (slide_id 'a1', patient_id 'A'): MSI 'MSS' vs 'MSI-H'" in message
    assert "row 4 (slide_id 'b1', patient_id 'B'): MSI 'MSI-H' vs 'MSS'" in message
    assert "slides.csv" in message and "clinical.csv" in message


def test_label_not_in_classes(tables):
    tmp, clinical, slides = tables
    with pytest.raises(CohortError, match=r"clinical.csv: label 'MSI-H' for 'A' is not in cohort.classes \['MSS', 'MSI'\]"):
        load_cohort(_cfg(tmp, clinical, slides, classes=["MSS", "MSI"]))


def test_missing_columns_are_named_with_the_files_own_columns_and_a_suggestion(tables):
    tmp, clinical, slides = tables
    lower = clinical.rename(columns={"patient_id": "Patient_ID", "MSI": "msi"}).assign(age=60)
    with pytest.raises(CohortError, match=r"label column cohort.target='MSI' not found in .* \(did you mean 'msi'\?\); "
                                          r"columns are \['patient_id', 'msi', 'age', 'slide_id'\]"):
        load_cohort(_cfg(tmp, lower, slides))
    renamed = slides.rename(columns={"patient_id": "patient", "slide_id": "slide"})  # 'patient' is an alias, 'slide' not
    with pytest.raises(CohortError, match=r"has no column 'slide_id'; columns are \['patient', 'slide'\]"):
        load_cohort(_cfg(tmp, clinical, renamed))


def test_duplicates(tables):
    tmp, clinical, slides = tables
    dup = pd.concat([slides, slides.iloc[[2]]])
    with pytest.raises(CohortError, match=r"slides.csv: duplicate slide_id 'b1' \(rows 4, 8\)"):
        load_cohort(_cfg(tmp, clinical, dup))
    with pytest.raises(CohortError, match="duplicate patient_id 'A'"):
        load_cohort(_cfg(tmp, pd.concat([clinical, clinical.iloc[[0]]]), slides))


def test_missing_columns_and_files(tables):
    tmp, clinical, slides = tables
    with pytest.raises(CohortError, match="slide table .* has no column 'slide_id'"):
        load_cohort(_cfg(tmp, clinical, slides.rename(columns={"slide_id": "slide"})))
    with pytest.raises(CohortError, match="label column cohort.target='KRAS' not found"):
        load_cohort(_cfg(tmp, clinical, slides, target="KRAS"))
    cfg = _cfg(tmp, clinical, slides)
    cfg.features_dir = str(tmp / "nope")
    with pytest.raises(CohortError, match="is not a folder"):
        load_cohort(cfg)


def test_inconsistent_bags(tables):
    tmp, clinical, slides = tables
    _bag(tmp / "features", "b1", dim=8)
    with pytest.raises(CohortError, match=r"different feature dimensions: .*a1.h5 has 4, .*b1.h5 has 8"):
        load_cohort(_cfg(tmp, clinical, slides))
    _bag(tmp / "features", "b1", encoder="other")
    with pytest.raises(CohortError, match=r"bags were made differently \(encoder, resolution or tile size\): .*a1.h5 and .*b1.h5 differ in encoder \('enc' vs 'other'\)"):
        load_cohort(_cfg(tmp, clinical, slides))


def test_corrupt_bag_named(tables):
    tmp, clinical, slides = tables
    (tmp / "features" / "b1.h5").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"b1.h5: not a readable HDF5 bag"):
        load_cohort(_cfg(tmp, clinical, slides))


# ---------------------------------------------------------------- bag identity (issue 11)
def test_bags_at_other_resolutions_or_tile_sizes_cannot_be_mixed(tables):
    tmp, clinical, slides = tables
    for sid in ["a1", "a2", "b1", "c1", "d1"]:
        write_bag(tmp / "features" / f"{sid}.h5", np.ones((5, 4)), attrs={"encoder": "enc", "mpp": 0.5, "tile_px": 224})
    assert load_cohort(_cfg(tmp, clinical, slides)).identity["mpp"] == "0.5"
    write_bag(tmp / "features" / "b1.h5", np.ones((5, 4)), attrs={"encoder": "enc", "mpp": 2.0, "tile_px": 224})
    with pytest.raises(CohortError, match=r"a1.h5 and .*b1.h5 differ in mpp \('0.5' vs '2'\)"):
        load_cohort(_cfg(tmp, clinical, slides))
    write_bag(tmp / "features" / "b1.h5", np.ones((5, 4)), attrs={"encoder": "enc", "mpp": 0.5, "tile_px": 448})
    with pytest.raises(CohortError, match=r"differ in tile_px \('224' vs '448'\)"):
        load_cohort(_cfg(tmp, clinical, slides))


def test_bags_that_do_not_record_their_identity_warn_once_and_can_be_declared(tables, caplog):
    tmp, clinical, slides = tables  # the fixture's bags record only the encoder
    with caplog.at_level("WARNING", logger="mil.cohort"):
        cohort = load_cohort(_cfg(tmp, clinical, slides))
    warnings = [r.message for r in caplog.records if "do not record" in r.message]
    assert len(warnings) == 1 and "encoder_weights, embedding, mpp, tile_px" in warnings[0]
    assert "cohort.bag_identity" in warnings[0] and cohort.identity["mpp"] == "unknown"

    caplog.clear()
    declared = {"encoder_weights": "sha256:abc", "embedding": "cls", "mpp": 0.5, "tile_px": 224}
    with caplog.at_level("WARNING", logger="mil.cohort"):
        cohort = load_cohort(_cfg(tmp, clinical, slides, bag_identity=declared))
    assert not [r for r in caplog.records if "do not record" in r.message]
    assert cohort.identity == {"encoder": "enc", "encoder_weights": "sha256:abc", "embedding": "cls",
                               "mpp": "0.5", "tile_px": "224"}
    with pytest.raises(CohortError, match=r"a1.h5 records encoder='enc', but cohort.bag_identity declares 'uni'"):
        load_cohort(_cfg(tmp, clinical, slides, bag_identity={"encoder": "uni"}))
    with pytest.raises(CohortError, match=r"cohort.bag_identity: unknown key\(s\) \['mmp'\]"):
        load_cohort(_cfg(tmp, clinical, slides, bag_identity={"mmp": 0.5}))
