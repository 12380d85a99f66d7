"""`mil predict` from slides: embed a new cohort's slides as the run's bags were made, then predict.

The prediction itself is :func:`mil.predict.run_predict` (bags only); this command-layer wrapper
adds the slide reading, which needs :mod:`encoders`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mil.predict import Run, RunMismatchError, load_run, prediction_config
from mil.predict import run_predict as predict_bags

logger = logging.getLogger(__name__)


def extract_missing_bags(run: Run, cfg: DictConfig) -> Path:
    """Predicting from slides: embed the cohort's slides into ``cohort.features_dir`` with the
    encoder, recipe and tiling recorded in the run; bags that already exist are kept.

    Returns the extraction summary CSV (a slide that failed is listed there with its reason).
    """
    from encoders.extract import run_extract  # the command layer is where mil meets encoders

    made = run.meta.get("extraction") or {}
    if "encoder" not in made:
        raise RunMismatchError(
            f"{run.path} was trained on bags that do not record how they were made (not from `mil extract`); "
            "extract the new cohort's bags with the same encoder, then predict from cohort.features_dir"
        )
    ecfg = cfg.copy()
    ecfg.features_dir = cfg.cohort.features_dir
    ecfg.encoder.name = made["encoder"]
    ecfg.encoder.embedding = made.get("embedding")
    ecfg.encoder.weights = cfg.encoder.weights or made.get("encoder_weights_source")
    for key in ("tile_px", "mpp", "min_tissue", "thumbnail_px"):
        if key in made:
            ecfg.tiling[key] = made[key]
    if not ecfg.slides.csv and not ecfg.slides.dir:
        ecfg.slides.csv = cfg.cohort.slide_csv  # the slide table may carry a path column
    logger.info("embedding the cohort's slides with %s (%s) as the run's bags were made", made["encoder"], made.get("embedding"))
    return run_extract(ecfg)


def slides_given(run: Run, cfg: DictConfig) -> bool:
    """Whether ``slides.dir`` / ``slides.csv`` are set for the new cohort (not inherited from the run)."""
    slides = (cfg.slides.dir, cfg.slides.csv)
    return any(slides) and slides != (run.config.slides.dir, run.config.slides.csv)


def predict_from_slides(run_dir: str | Path, overrides: list[str]) -> tuple[Path, Path | None]:
    """:func:`run_predict`, also returning the extraction summary CSV (None when no slides were embedded).

    A slide whose extraction failed has no bag, so the cohort skips it and the others are
    predicted; the summary lists it with its reason (``mil predict`` then exits non-zero).
    """
    run = load_run(run_dir)
    summary = None
    if slides_given(run, cfg := prediction_config(run, overrides)):
        summary = extract_missing_bags(run, cfg)
    return predict_bags(run_dir, overrides), summary


def run_predict(run_dir: str | Path, overrides: list[str]) -> Path:
    """Predict every bag of the configured cohort; write predictions (and metrics when labelled).

    With ``slides.dir`` or ``slides.csv`` set for the new cohort, its slides are embedded first (see
    :func:`extract_missing_bags`), so a new cohort can be predicted straight from its slides.
    Returns the output folder.
    """
    return predict_from_slides(run_dir, overrides)[0]
