"""`mil demo` (tiny preset): the whole pipeline learns, and its heatmaps find the planted regions."""

from __future__ import annotations

import shlex

import numpy as np
import pandas as pd

from encoders.synthetic_slides import load_ground_truth
from mil.bags import read_bag_info
from mil.commands.demo import run_demo, summary
from mil.commands.predict import run_predict
from mil.config import load_config


def test_tiny_demo_learns_and_localises(tmp_path):
    result = run_demo(tmp_path / "demo", size="tiny")
    assert result.crossval_auroc["value"] >= 0.85
    assert result.external_auroc >= 0.85
    truth = load_ground_truth(tmp_path / "demo" / "external_cohort" / "ground_truth.json")
    hits = []
    for sid in result.heatmap_slides:
        slide = truth[sid]
        if not slide.tumour:
            continue
        scores = pd.read_csv(tmp_path / "demo" / "heatmaps" / f"{sid}_scores.csv")
        size = float(read_bag_info(tmp_path / "demo" / "external_features" / f"{sid}.h5").attrs["tile_size_level0"])
        top = scores.nlargest(max(1, round(0.05 * len(scores))), "score")
        hits.append(float((slide.tumour_fraction(top[["x", "y"]].to_numpy(), size) > 0).mean()))
    assert hits, "no positive slide among the heatmap slides"
    assert np.mean(hits) >= 0.8, hits
    for name in ("summary.md", "roc.png", "pr.png", "predictions.csv"):
        assert (result.crossval / name).is_file()
    assert (result.external / "metrics.json").is_file()
    assert any(p.name.endswith("_heatmap.png") for p in result.heatmaps)
    assert "Cross-validated AUROC" in summary(result)
    # The step to rerun by hand points at this --out, not at the configs' demo_output/ paths.
    command = shlex.split(result.crossval_command)
    assert command[:2] == ["mil", "crossval"] and f"output_dir={result.crossval}" in command
    assert load_config(command[2:]).cohort.features_dir == str(tmp_path / "demo" / "features")

    # Predicting straight from slides: no bags yet, so `mil predict` embeds them as the run's bags were made.
    ext = tmp_path / "demo" / "external_cohort"
    out = run_predict(result.crossval, [f"cohort.clinical_csv={ext / 'clinical.csv'}", f"cohort.slide_csv={ext / 'slides.csv'}",
                                        f"cohort.features_dir={tmp_path / 'fresh'}", f"slides.csv={ext / 'slides.csv'}",
                                        f"output_dir={tmp_path / 'from_slides'}"])
    made = read_bag_info(next((tmp_path / "fresh").glob("*.h5"))).attrs
    first = read_bag_info(next((tmp_path / "demo" / "features").glob("*.h5"))).attrs
    assert {k: made[k] for k in ("encoder", "embedding", "tile_px", "mpp")} == {k: first[k] for k in ("encoder", "embedding", "tile_px", "mpp")}
    again = pd.read_csv(out / "predictions.csv")
    before = pd.read_csv(result.external / "predictions.csv")
    np.testing.assert_allclose(again["prob_MSI-H"], before["prob_MSI-H"], atol=1e-5)
