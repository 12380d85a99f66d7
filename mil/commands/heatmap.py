"""`mil heatmap`: where a trained run's attention falls on a slide.

For each requested slide of the configured cohort: per-tile attention from every model of the
run (the folds of a cross-validation, or the single trained model), averaged, written as
``<slide_id>_scores.csv`` (``x``, ``y``, ``score``: one row per tile in the bag's order, raw
averaged attention) and drawn over the slide thumbnail (``<slide_id>_heatmap.png``), with the
top-k and bottom-k tiles read from the slide at the bag's resolution (``<slide_id>_tiles.png``).
Without the slide file the heatmap is a scatter of the tiles at their level-0 positions.

Which attention each model gives, per-class maps and patient-level bags: see :mod:`mil.attention`.

Display: each tile's percentile rank within its slide (see :func:`percentile_scores`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from mil.attention import HeatmapError, SlideAttention, slide_attention
from mil.cohort import read_table
from mil.config import ConfigError, load_config
from mil.heatmap_render import (
    colour_bar,
    heat_raster,
    overlay_panel,
    percentile_scores,
    scatter_panel,
    text_px_for,
    tile_grid,
    with_header,
)
from mil.io import atomic_path
from mil.predict import Run, load_run

logger = logging.getLogger(__name__)

__all__ = ["HeatmapError", "SlideLocator", "run_heatmap", "write_scores"]

MAX_PX = 2048  # longest side of the heatmap panel


def tile_size_level0(attrs: dict, coords: np.ndarray, path: Path) -> float:
    """The tiles' side in level-0 pixels: the bag's attribute, else from its mpp, else the grid step."""
    if "tile_size_level0" in attrs:
        return float(attrs["tile_size_level0"])
    with contextlib.suppress(KeyError, TypeError, ValueError):
        return float(attrs["tile_px"]) * float(attrs["mpp"]) / float(attrs["slide_mpp"])
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
    steps = [s[s > 0].min() for s in steps if (s > 0).any()]
    if not steps:
        raise HeatmapError(f"{path}: cannot tell the tile size (no tile_size_level0 attribute and a single tile)")
    return float(min(steps))


class SlideLocator:
    """Finds slide files: ``slides.csv``, else the cohort slide table's path column, else ``slides.dir``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.table: dict[str, tuple[Path, float | None]] = {}
        self.source = ""
        s = cfg.slides
        if s.csv:
            from encoders.sources import list_slides

            self.table = {r.slide_id: (r.path, r.mpp) for r in list_slides(s)}
            self.source = f"slides.csv={s.csv}"
        elif cfg.cohort.slide_csv:
            df = read_table(cfg.cohort.slide_csv, [cfg.cohort.slide_column], "slide table")
            if s.path_column in df.columns:
                base = Path(cfg.cohort.slide_csv).parent
                for _, row in df.iterrows():
                    if isinstance(row[s.path_column], str) and row[s.path_column].strip():
                        p = Path(row[s.path_column].strip()).expanduser()
                        mpp = pd.to_numeric(row.get("mpp"), errors="coerce")
                        self.table[row[cfg.cohort.slide_column]] = (
                            p if p.is_absolute() else base / p, None if pd.isna(mpp) else float(mpp))
                self.source = f"the {s.path_column!r} column of {cfg.cohort.slide_csv}"

    def locate(self, slide_id: str, attrs: dict) -> tuple[Path | None, float | None, str]:
        """(path or None, mpp override, where it looked)."""
        if slide_id in self.table:
            path, mpp = self.table[slide_id]
            return (path if path.exists() else None), mpp, f"{path} (from {self.source})"
        d = self.cfg.slides.dir
        if not d:
            return None, None, (f"{slide_id} is not in {self.source}" if self.source else
                                "no slides.dir, slides.csv or path column in the slide table")
        names = [str(attrs["slide_file"])] if attrs.get("slide_file") else []
        names += [f"{slide_id}{ext}" for ext in self.cfg.slides.extensions]
        for name in names:
            if (Path(d) / name).is_file():
                return Path(d) / name, None, str(Path(d) / name)
        return None, None, f"{d}/{slide_id}.* (slides.extensions)"


def heatmap_config(run: Run, overrides: list[str]) -> DictConfig:
    """The run's config with the cohort (and slide) overrides merged in."""
    return load_config(overrides, base=run.config)


def _save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=3)
    return path


def write_scores(path: Path, coords: np.ndarray, scores: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "score": scores}).to_csv(tmp, index=False, float_format="%.8g")
    return path


def _caption(sa: SlideAttention, run: Run) -> list[str]:
    names = list(run.weights)
    n_slides = len(sa.bag.slide_ids)
    lines = [
        f"{sa.slide_id}: {len(sa.coords)} tiles; patient {sa.bag.patient_id}"
        + (f" (attention over the patient's {n_slides} slides)" if n_slides > 1 else ""),
        f"{run.config.model.name} attention, "
        + (f"mean of {len(names)} fold models ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
           if len(names) > 1 else "single model"),
    ]
    if sa.probs:
        lines.append("prediction: " + ", ".join(f"{c} {p:.2f}" for c, p in sa.probs.items())
                     + (f"; map of class {sa.class_name}" if sa.class_name else ""))
    lines.append("colour: the tile's attention percentile within this slide (raw values in the scores CSV)")
    return lines


def _tile_images(slide, path: Path, coords: np.ndarray, attrs: dict, ts: float, slide_mpp: float | None
                 ) -> list[Image.Image]:
    """Tiles as the encoder saw them (bag mpp and tile size) when known, else level-0 crops."""
    from encoders.slides import read_region
    from encoders.tiling import plan_tiles, read_tile

    if slide_mpp and "mpp" in attrs and "tile_px" in attrs:
        plan = plan_tiles(slide_mpp, float(attrs["mpp"]), int(attrs["tile_px"]), slide.level_downsamples)
        return [read_tile(slide, path, int(x), int(y), plan) for x, y in coords]
    side = max(1, int(np.ceil(ts)))
    return [read_region(slide, path, (int(x), int(y)), 0, (side, side)) for x, y in coords]


def _scatter_view(sa: SlideAttention, ts: float, shown: np.ndarray, max_px: int) -> Image.Image:
    """Tiles coloured at their level-0 positions on a canvas of the slide's size (from the bag)."""
    W = int(sa.attrs.get("slide_width", 0)) or int(np.ceil(sa.coords[:, 0].max() + ts))
    H = int(sa.attrs.get("slide_height", 0)) or int(np.ceil(sa.coords[:, 1].max() + ts))
    scale = min(1.0, max_px / max(W, H))
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    return scatter_panel(heat_raster(sa.coords, shown, ts, (W, H), size))


def _slide_view(slide, path: Path, sa: SlideAttention, cfg: DictConfig, mpp_override: float | None, ts: float,
                shown: np.ndarray, top_k: int, max_px: int) -> tuple[Image.Image, Image.Image]:
    """(overlay on the thumbnail with the tissue outline, grid of the top and bottom tiles)."""
    from encoders.slides import SlideError, SlideRef, read_thumbnail, resolve_mpp
    from encoders.tissue import detect_tissue

    W, H = slide.dimensions
    expected = (sa.attrs.get("slide_width"), sa.attrs.get("slide_height"))
    if None not in expected and (int(expected[0]), int(expected[1])) != (W, H):
        raise HeatmapError(f"{path} is {W}x{H} px but the bag {sa.bag_path} was made from a "
                           f"{expected[0]}x{expected[1]} px slide: is it the same file?")
    slide_mpp = sa.attrs.get("slide_mpp")  # what extraction used
    if slide_mpp is None:
        with contextlib.suppress(SlideError):
            slide_mpp = resolve_mpp(slide, SlideRef(sa.slide_id, path, mpp_override), cfg.slides.mpp)[0]
    thumb = read_thumbnail(slide, path, max_px)
    tissue = None
    if slide_mpp is not None:  # the detector needs the pixel size; without it, no outline
        tissue = detect_tissue(np.asarray(thumb), um_per_px=float(slide_mpp) * W / thumb.width).mask
    panel = overlay_panel(thumb, heat_raster(sa.coords, shown, ts, (W, H), thumb.size), tissue)
    k = min(top_k, len(sa.scores))
    order = np.argsort(-sa.scores, kind="stable")
    rows = []
    for title, idx in ((f"top {k} tiles (highest attention)", order[:k]),
                       (f"bottom {k} tiles (lowest attention)", order[::-1][:k])):
        tiles = _tile_images(slide, path, sa.coords[idx], sa.attrs, ts, slide_mpp)
        caps = [f"#{i} ({x},{y})\n{sa.scores[i]:.3g} p{100 * shown[i]:.0f}"
                for i, (x, y) in zip(idx, sa.coords[idx], strict=True)]
        rows.append((title, tiles, caps))
    grid = with_header(tile_grid(rows), [f"{sa.slide_id}: tiles by attention "
                                         "(tile index, level-0 x,y; raw score, percentile)"])
    return panel, grid


def render(sa: SlideAttention, run: Run, cfg: DictConfig, locator: SlideLocator, out: Path, top_k: int,
           max_px: int = MAX_PX) -> list[Path]:
    """Write the heatmap PNG (overlay, or scatter without the slide) and, with the slide, the tile grid."""
    ts = tile_size_level0(sa.attrs, sa.coords, sa.bag_path)
    shown = percentile_scores(sa.scores)
    caption = _caption(sa, run)
    path, mpp_override, looked = locator.locate(sa.slide_id, sa.attrs)
    slide = None
    if path is not None:
        try:
            from encoders.slides import SlideError, open_slide

            slide = open_slide(path)
        except (ImportError, SlideError) as e:
            looked = f"{path}: {e}"
    written = []
    if slide is None:
        logger.warning("%s: no slide file (%s); drawing a scatter of the tiles instead", sa.slide_id, looked)
        panel = _scatter_view(sa, ts, shown, max_px)
        caption.append(f"slide file not available ({looked}): tiles at their level-0 positions, no thumbnail")
    else:
        try:
            panel, grid = _slide_view(slide, path, sa, cfg, mpp_override, ts, shown, top_k, max_px)
        finally:
            slide.close()
        written.append(_save_png(grid, out / f"{sa.slide_id}_tiles.png"))
    text_px = text_px_for(panel)
    figure = with_header(panel, caption, colour_bar(panel.height, "attention percentile", text_px), text_px)
    return [_save_png(figure, out / f"{sa.slide_id}_heatmap.png"), *written]


def run_heatmap(
    run_dir: str | os.PathLike,
    overrides: list[str],
    slide_ids: list[str],
    top_k: int = 8,
    out_dir: str | os.PathLike | None = None,
    target_class: str | None = None,
    max_px: int = MAX_PX,
) -> list[Path]:
    """Heatmaps, tile grids and score CSVs for ``slide_ids``; returns the files written.

    ``overrides`` (YAML paths or ``key=value``) are merged over the run's config, e.g. to point
    ``cohort.*`` at another cohort or ``slides.dir`` at the slide files. Slide files come from
    ``slides.csv``, else the slide table's ``slides.path_column`` column (relative to the
    table), else ``slides.dir`` (the bag's recorded file name, or ``<slide_id><extension>``).
    Output goes to ``out_dir``, else to ``output_dir`` when the overrides change it, else
    ``<run>/heatmaps``. ``target_class`` picks the class map of per-class models (default:
    the predicted class); ``max_px`` is the longest side of the heatmap panel.
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    run = load_run(run_dir)
    cfg = heatmap_config(run, overrides)
    if out_dir is not None:
        out = Path(out_dir)
    elif cfg.output_dir != run.config.output_dir:
        out = Path(cfg.output_dir)
    else:
        out = run.path / "heatmaps"
    results = slide_attention(run, cfg, list(slide_ids), target_class)
    locator = SlideLocator(cfg)
    written: list[Path] = []
    for sa in results:
        written.append(write_scores(out / f"{sa.slide_id}_scores.csv", sa.coords, sa.scores))
        written += render(sa, run, cfg, locator, out, top_k, max_px)
        logger.info("%s: heatmap in %s", sa.slide_id, out)
    return written
