"""`mil heatmap`: where a trained run's attention falls on a slide.

For each requested slide of the configured cohort: per-tile attention from every model of the
run (the folds of a cross-validation, or the single trained model), averaged, written as
``<slide_id>_scores.csv`` (``x``, ``y``, ``score``: one row per tile in the bag's order, raw
averaged attention) and drawn over the slide thumbnail (``<slide_id>_heatmap.png``), with the
top-k and bottom-k tiles read from the slide at the bag's resolution (``<slide_id>_tiles.png``).
Without the slide file the heatmap is a scatter of the tiles at their level-0 positions, with axes in µm.
``formats`` may add ``<slide_id>_tiles.geojson``: one QuPath detection per tile (see :func:`write_geojson`).

Which slides: those named, else every slide of the cohort, or (``top``) the slides of the N
most confidently positive and N most confidently negative bags.

Which attention each model gives, per-class maps and patient-level bags: see :mod:`mil.attention`.

Display (``scale``): ``slide``, each tile's percentile rank within its slide (see
:func:`percentile_scores`); or ``cohort``, each tile's relative attention r = attention x tiles
in its bag (1 = uniform) on a log scale shared by all slides drawn together:
``clip(log r / log r99, 0, 1)`` with r99 the 99th percentile of r over those slides. A slide
whose attention is spread evenly (often a negative one) then stays cold instead of showing
its own top tiles as hot.
"""

from __future__ import annotations

import contextlib
import json
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
    ALPHA,
    colour_bar,
    heat_raster,
    micron_axes,
    overlay_panel,
    percentile_scores,
    scale_bar,
    scatter_panel,
    side_by_side,
    text_px_for,
    tile_grid,
    with_header,
)
from mil.io import atomic_path
from mil.predict import Run, load_run

logger = logging.getLogger(__name__)

__all__ = ["HeatmapError", "SlideLocator", "run_heatmap", "write_geojson", "write_scores"]

MAX_PX = 2048  # longest side of the heatmap panel
FORMATS = ("png", "geojson")
COHORT_QUANTILE = 0.99  # --scale cohort: this quantile of relative attention over the drawn slides is the top colour
SCALES = ("slide", "cohort")


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


def write_geojson(path: Path, slide_id: str, coords: np.ndarray, tile_size: float, scores: np.ndarray,
                  percentiles: np.ndarray) -> Path:
    """A QuPath-importable GeoJSON FeatureCollection: one detection Polygon per tile.

    Coordinates are level-0 pixels (QuPath's image space): the tile with top-left corner
    ``(x, y)`` is the closed ring ``(x, y) (x+s, y) (x+s, y+s) (x, y+s) (x, y)`` with ``s`` =
    ``tile_size``. ``properties.measurements`` holds ``attention`` (the raw ensemble score) and
    ``attention percentile`` (0-100, within the slide), which QuPath shows in its measurement
    table and can colour by (Measure > Show measurement maps). Drag the file onto the open slide.
    """
    features = []
    for (x, y), score, pct in zip(np.asarray(coords, float), scores, percentiles, strict=True):
        x0, y0, x1, y1 = float(x), float(y), float(x + tile_size), float(y + tile_size)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "detection", "name": slide_id,
                           "measurements": {"attention": float(score), "attention percentile": round(100 * float(pct), 3)}},
        })
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def read_slide_list(path: str | os.PathLike) -> list[str]:
    """Slide ids from a text file (one per line; blank lines and ``#`` comments skipped) or a CSV
    with a ``slide_id`` column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--slides {path}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if lines and "," in lines[0]:
        df = pd.read_csv(path, dtype=str)
        if "slide_id" not in df.columns:
            raise ConfigError(f"--slides {path}: a CSV needs a slide_id column; columns are {list(df.columns)}")
        return df["slide_id"].dropna().str.strip().tolist()
    ids = lines[1:] if lines and lines[0] == "slide_id" else lines
    if not ids:
        raise ConfigError(f"--slides {path}: the file names no slide")
    return ids


def cohort_slides(cfg: DictConfig) -> list[str]:
    """Every slide of the configured cohort that has a bag, in the cohort's order."""
    from mil.cohort import load_cohort

    cohort = load_cohort(cfg.cohort, require_labels=False, columns=[])
    return [sid for bag in cohort.bags for sid in bag.slide_ids]


def most_confident(results: list[SlideAttention], n: int) -> list[SlideAttention]:
    """The slides of the ``n`` bags with the highest and the ``n`` with the lowest P(positive class).

    Binary runs: the positive class is the last one. Multi-class runs: the ``n`` bags with the
    highest probability of each class.
    """
    bags: dict[str, list[SlideAttention]] = {}
    for sa in results:
        bags.setdefault(sa.bag.bag_id, []).append(sa)
    probs = {b: parts[0].probs for b, parts in bags.items()}
    if not all(probs.values()):
        raise ConfigError("--top needs a classification run (it ranks bags by their predicted probability)")
    classes = list(next(iter(probs.values())))
    ids = list(bags)
    if len(classes) == 2:
        ranked = sorted(ids, key=lambda b: -probs[b][classes[-1]])
        chosen = ranked[:n] + [b for b in ranked[::-1][:n] if b not in ranked[:n]]
    else:
        chosen = []
        for c in classes:
            chosen += [b for b in sorted(ids, key=lambda b: -probs[b][c])[:n] if b not in chosen]
    return [sa for b in chosen for sa in bags[b]]


def relative_attention(sa: SlideAttention) -> np.ndarray:
    """Attention times the number of tiles in the bag: 1 where attention is uniform."""
    return sa.scores * max(1, sa.bag_tiles or len(sa.scores))


def displayed_scores(results: list[SlideAttention], scale: str) -> list[np.ndarray]:
    """The [0, 1] colour value of every tile of each slide on the chosen ``scale`` (see the module doc)."""
    if scale == "slide":
        return [percentile_scores(sa.scores) for sa in results]
    if scale != "cohort":
        raise ConfigError(f"--scale must be one of {list(SCALES)}, got {scale!r}")
    relative = np.concatenate([relative_attention(sa) for sa in results])
    top = float(np.quantile(relative, COHORT_QUANTILE)) if len(relative) else 1.0
    log_r = np.log(np.clip(relative, 1e-12, None))
    shown = np.clip(log_r / np.log(top), 0.0, 1.0) if top > 1.0 else np.zeros_like(relative)
    return np.split(shown, np.cumsum([len(sa.scores) for sa in results])[:-1])


def _scale_text(scale: str, n_slides: int) -> str:
    if scale == "cohort":
        return (f"colour: scale cohort, log relative attention (attention x tiles in the bag): 0 = uniform or less, "
                f"100 = the 99th percentile over all tiles of the {n_slides} slides drawn together")
    return "colour: scale slide, the tile's attention percentile within this slide (raw values in the scores CSV)"


def _caption(sa: SlideAttention, run: Run) -> list[str]:
    names = list(run.weights)
    n_slides = len(sa.bag.slide_ids)
    lines = [
        f"{sa.slide_id}: {len(sa.coords)} tiles; patient {sa.bag.patient_id}"
        + (f" (attention over the patient's {n_slides} slides)" if n_slides > 1 else ""),
        f"{run.config.model.name} attention, "
        + (f"mean of {len(names)} models ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
           if len(names) > 1 else "single model"),
    ]
    if sa.probs:
        lines.append("prediction: " + ", ".join(f"{c} {p:.2f}" for c, p in sa.probs.items())
                     + (f"; map of class {sa.class_name}" if sa.class_name else ""))
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
    """Tiles coloured at their level-0 positions on a canvas of the slide's size (from the bag),
    with axes in µm when the bag records the slide's mpp."""
    W = int(sa.attrs.get("slide_width", 0)) or int(np.ceil(sa.coords[:, 0].max() + ts))
    H = int(sa.attrs.get("slide_height", 0)) or int(np.ceil(sa.coords[:, 1].max() + ts))
    scale = min(1.0, max_px / max(W, H))
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    panel = scatter_panel(heat_raster(sa.coords, shown, ts, (W, H), size))
    slide_mpp = sa.attrs.get("slide_mpp")
    return micron_axes(panel, float(slide_mpp) * W / size[0], text_px_for(panel)) if slide_mpp else panel


def _slide_view(slide, path: Path, sa: SlideAttention, cfg: DictConfig, mpp_override: float | None, ts: float,
                shown: np.ndarray, top_k: int, max_px: int, opacity: float = ALPHA) -> tuple[Image.Image, Image.Image]:
    """(the H&E thumbnail beside its overlay with the tissue outline, scale bars in µm; grid of the top and
    bottom tiles)."""
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
    panel = overlay_panel(thumb, heat_raster(sa.coords, shown, ts, (W, H), thumb.size), tissue, alpha=opacity)
    if slide_mpp is not None:
        um_per_px, text_px = float(slide_mpp) * W / thumb.width, text_px_for(panel)
        thumb, panel = scale_bar(thumb, um_per_px, text_px), scale_bar(panel, um_per_px, text_px)
    panel = side_by_side(thumb, panel)
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
           max_px: int = MAX_PX, shown: np.ndarray | None = None, scale_text: str | None = None,
           opacity: float = ALPHA) -> list[Path]:
    """Write the heatmap PNG (overlay, or scatter without the slide) and, with the slide, the tile grid.

    ``shown`` are the tiles' [0, 1] colour values (default: percentiles within the slide), described
    in the caption by ``scale_text``; ``opacity`` is the overlay's.
    """
    ts = tile_size_level0(sa.attrs, sa.coords, sa.bag_path)
    shown = percentile_scores(sa.scores) if shown is None else shown
    caption = [*_caption(sa, run), scale_text or _scale_text("slide", 1)]
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
            panel, grid = _slide_view(slide, path, sa, cfg, mpp_override, ts, shown, top_k, max_px, opacity)
        finally:
            slide.close()
        written.append(_save_png(grid, out / f"{sa.slide_id}_tiles.png"))
    text_px = text_px_for(panel)
    cohort = bool(scale_text and "scale cohort" in scale_text)
    bar_label = "log relative attention (cohort scale)" if cohort else "attention percentile (within slide)"
    figure = with_header(panel, caption, colour_bar(panel.height, bar_label, text_px), text_px)
    return [_save_png(figure, out / f"{sa.slide_id}_heatmap.png"), *written]


def run_heatmap(
    run_dir: str | os.PathLike,
    overrides: list[str],
    slide_ids: list[str] | None = None,
    top_k: int = 8,
    out_dir: str | os.PathLike | None = None,
    target_class: str | None = None,
    max_px: int = MAX_PX,
    top: int | None = None,
    formats: tuple[str, ...] | list[str] = ("png",),
    scale: str = "slide",
    opacity: float = ALPHA,
) -> list[Path]:
    """Heatmaps, tile grids, score CSVs (and QuPath GeoJSON) for slides of a cohort; returns the files written.

    ``overrides`` (YAML paths or ``key=value``) are merged over the run's config, e.g. to point
    ``cohort.*`` at another cohort or ``slides.dir`` at the slide files. Slide files come from
    ``slides.csv``, else the slide table's ``slides.path_column`` column (relative to the
    table), else ``slides.dir`` (the bag's recorded file name, or ``<slide_id><extension>``).
    Which slides: ``slide_ids``; else every slide of the cohort, or with ``top`` the slides of
    the ``top`` most confidently positive and ``top`` most confidently negative bags.
    Output goes to ``out_dir``, else to ``output_dir`` when the overrides change it, else
    ``<run>/heatmaps``. ``target_class`` picks the class map of per-class models (default:
    the predicted class); ``max_px`` is the longest side of the heatmap panel; ``formats`` any
    of ``png`` (heatmap and tile grid) and ``geojson`` (``<slide_id>_tiles.geojson`` for QuPath);
    ``scale`` ``slide`` or ``cohort`` (see the module doc); ``opacity`` the overlay's, in [0, 1].
    """
    from tqdm.auto import tqdm

    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top is not None and top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    if top is not None and slide_ids:
        raise ConfigError("give either slide ids (--slide / --slides) or --top, not both")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format must be among {list(FORMATS)}, got {list(formats)}")
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {list(SCALES)}, got {scale!r}")
    if not 0.0 <= opacity <= 1.0:
        raise ConfigError(f"--opacity must lie in [0, 1], got {opacity}")
    run = load_run(run_dir)
    cfg = heatmap_config(run, overrides)
    if out_dir is not None:
        out = Path(out_dir)
    elif cfg.output_dir != run.config.output_dir:
        out = Path(cfg.output_dir)
    else:
        out = run.path / "heatmaps"
    results = slide_attention(run, cfg, list(slide_ids) if slide_ids else cohort_slides(cfg), target_class)
    if top is not None:
        results = most_confident(results, top)
    shown_all = displayed_scores(results, scale)
    scale_text = _scale_text(scale, len(results))
    locator = SlideLocator(cfg)
    written: list[Path] = []
    bar = tqdm(list(zip(results, shown_all, strict=True)), desc="heatmaps", unit="slide", disable=None)
    for sa, shown in bar:
        bar.set_postfix_str(sa.slide_id)
        written.append(write_scores(out / f"{sa.slide_id}_scores.csv", sa.coords, sa.scores))
        if "geojson" in formats:
            ts = tile_size_level0(sa.attrs, sa.coords, sa.bag_path)
            written.append(write_geojson(out / f"{sa.slide_id}_tiles.geojson", sa.slide_id, sa.coords, ts, sa.scores,
                                         percentile_scores(sa.scores)))
        if "png" in formats:
            written += render(sa, run, cfg, locator, out, top_k, max_px, shown, scale_text, opacity)
        logger.debug("%s: heatmap in %s", sa.slide_id, out)
    logger.info("%d slide(s) drawn in %s (scale %s)", len(results), out, scale)
    return written
