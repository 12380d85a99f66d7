"""`mil demo`: the whole toolkit end to end on generated slides, in minutes on a laptop CPU.

The demo is a script over the public commands and the configs in ``configs/demo/``: it writes
a synthetic slide cohort and a separately generated external cohort (real pyramidal TIFFs,
with planted tumour-like regions in positive patients' slides), then runs ``mil extract``,
``mil crossval``, ``mil predict``, ``mil heatmap`` and ``mil report`` on them. Anything it
does can be repeated by hand with the commands in the YAML files' headers.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mil.config import load_config

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


@dataclass(frozen=True)
class DemoSize:
    """How big the generated cohorts are; ``full`` is the documented demo, ``tiny`` a smoke test."""

    patients: int
    external_patients: int
    slide_px: tuple[int, int]
    tile_px: int
    folds: int
    max_epochs: int
    min_steps: int  # the recipe's step budget; tiny: a smoke test


SIZES = {
    "full": DemoSize(patients=40, external_patients=15, slide_px=(3072, 2304), tile_px=224, folds=5, max_epochs=20, min_steps=1000),
    "tiny": DemoSize(patients=16, external_patients=8, slide_px=(1024, 800), tile_px=64, folds=3, max_epochs=20, min_steps=300),
}


@dataclass
class DemoResult:
    out: Path
    crossval: Path
    external: Path
    heatmaps: list[Path]
    crossval_auroc: dict[str, float]
    external_auroc: float
    heatmap_slides: list[str]
    extract_summaries: list[Path] = field(default_factory=list)  # per cohort; failed slides are listed there
    crossval_command: str = ""  # the cross-validation step as a command to rerun by hand (paths under ``out``)


def _overrides(out: Path, size: DemoSize, encoder: str, weights: str | None) -> dict[str, list[str]]:
    """Point the demo configs at ``out`` and apply the size preset."""
    c, e = out / "cohort", out / "external_cohort"
    extract = [f"tiling.tile_px={size.tile_px}", f"encoder.name={encoder}"] + (
        [f"encoder.weights={weights}"] if weights else []
    )
    return {
        "extract": [*extract, f"slides.csv={c / 'slides.csv'}", f"features_dir={out / 'features'}"],
        "extract_external": [*extract, f"slides.csv={e / 'slides.csv'}", f"features_dir={out / 'external_features'}"],
        "crossval": [
            f"cohort.clinical_csv={c / 'clinical.csv'}", f"cohort.slide_csv={c / 'slides.csv'}",
            f"cohort.features_dir={out / 'features'}", f"cv.folds={size.folds}",
            f"train.max_epochs={size.max_epochs}", f"train.min_steps={size.min_steps}", f"output_dir={out / 'crossval'}",
        ],
        "external": [
            f"cohort.clinical_csv={e / 'clinical.csv'}", f"cohort.slide_csv={e / 'slides.csv'}",
            f"cohort.features_dir={out / 'external_features'}", f"slides.csv={e / 'slides.csv'}",
            f"output_dir={out / 'external'}",
        ],
    }


def _heatmap_slides(external: Path, slide_csv: Path, n: int = 3) -> list[str]:
    """The external cohort's most and least confidently positive patients' first slides."""
    pred = pd.read_csv(external / "predictions.csv", dtype={"patient_id": str})
    slides = pd.read_csv(slide_csv, dtype=str)
    ranked = pred.sort_values("prob_MSI-H", ascending=False).patient_id.tolist()
    patients = [*ranked[: n - 1], ranked[-1]]
    return [slides[slides.patient_id == p].slide_id.iloc[0] for p in patients]


def run_demo(out: str | Path = "demo_output", size: str = "full", encoder: str = "random-vit-tiny",
             weights: str | None = None) -> DemoResult:
    """Generate the demo cohorts and run extract, crossval, predict, heatmap and report on them."""
    from encoders.extract import run_extract
    from encoders.synthetic_slides import make_slide_cohort
    from mil.commands.heatmap import run_heatmap
    from mil.commands.predict import run_predict
    from mil.crossval import run_crossval
    from mil.report import report_predictions

    if size not in SIZES:
        raise ValueError(f"demo size must be one of {sorted(SIZES)}, got {size!r}")
    preset, out = SIZES[size], Path(out)
    keys = _overrides(out, preset, encoder, weights)
    start = time.perf_counter()

    def step(name: str) -> None:
        logger.info("demo [%5.0f s] %s", time.perf_counter() - start, name)

    step(f"writing {preset.patients} + {preset.external_patients} patients' synthetic slides to {out}")
    make_slide_cohort(out / "cohort", n_patients=preset.patients, seed=0, size=preset.slide_px)
    make_slide_cohort(out / "external_cohort", n_patients=preset.external_patients, seed=1, size=preset.slide_px, prefix="E")
    step(f"mil extract ({encoder})")
    summaries = [run_extract(load_config([str(CONFIGS / "extract.yaml"), *keys[k]]))
                 for k in ("extract", "extract_external")]
    step("mil crossval (gated_abmil)")
    cv = run_crossval(load_config([str(CONFIGS / "crossval.yaml"), *keys["crossval"]]))
    step("mil predict on the external cohort")
    ext_overrides = [str(CONFIGS / "external.yaml"), *keys["external"]]
    external = run_predict(cv, ext_overrides)
    step("mil heatmap")
    slides = _heatmap_slides(external, out / "external_cohort" / "slides.csv")
    heatmaps = run_heatmap(cv, ext_overrides, slides, out_dir=out / "heatmaps")
    step("mil report")
    report_predictions(external)
    cv_auroc = json.loads((cv / "metrics.json").read_text())["pooled"]["auroc"]
    ext_auroc = json.loads((external / "metrics.json").read_text())["pooled"]["auroc"]["value"]
    step("done")
    command = shlex.join(["mil", "crossval", str(CONFIGS / "crossval.yaml"), *keys["crossval"]])
    return DemoResult(out, cv, external, heatmaps, cv_auroc, ext_auroc, slides, summaries, command)


def summary(result: DemoResult) -> str:
    """What the demo prints at the end: headline metrics and where every output is."""
    a = result.crossval_auroc
    pngs = sorted(str(p) for p in result.heatmaps if p.name.endswith("_heatmap.png"))
    return "\n".join([
        "",
        f"Cross-validated AUROC (pooled out-of-fold): {a['value']:.3f} [95% CI {a['ci_low']:.3f}-{a['ci_high']:.3f}]",
        f"External cohort AUROC (fold ensemble):      {result.external_auroc:.3f}",
        "",
        f"  cross-validation   {result.crossval}/summary.md, roc.png, pr.png, predictions.csv",
        f"  external cohort    {result.external}/metrics.json, roc.png, predictions.csv",
        f"  heatmaps           {', '.join(pngs)}",
        f"  QC thumbnails      {result.out}/features/qc/",
        f"  configs            {CONFIGS}/*.yaml (their paths assume `--out demo_output` run from the repository;",
        "                     each step is `mil <command> <config> <overrides>`, e.g. this demo's cross-validation:)",
        f"    {result.crossval_command}",
    ])
