"""What the viewer serves: a run's cohort table, and per slide its attention, overlays and Deep Zoom tiles.

Everything is looked up by id in the cohort of the run's config (with the user's overrides
merged in, as for ``mil heatmap``); no path ever comes from a request. Per-tile scores are the
ones ``mil heatmap`` writes (:func:`mil.attention.slide_attention`, averaged over the run's
models), computed once per slide and kept in memory, as are the overlay PNGs.

Colour scales:

* ``slide``: the tile's percentile rank within its slide, as in ``mil heatmap``;
* ``cohort``: the percentile rank, among all tiles of the cohort, of the tile's attention
  relative to uniform attention over its bag (``score x tiles in the bag``; a softmax over
  N tiles gives 1/N to each tile when it attends evenly, so raw weights of bags of different
  sizes are not comparable). It needs every bag's attention, so the first request runs the
  models over the whole cohort once.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from omegaconf import OmegaConf
from PIL import Image

from mil.attention import HeatmapError, SlideAttention, slide_attention
from mil.cohort import Bag, load_cohort
from mil.commands.heatmap import SlideLocator, heatmap_config, tile_size_level0
from mil.heatmap_render import CMAP, heat_raster, percentile_scores
from mil.predict import Run, check_compatible, load_run

logger = logging.getLogger(__name__)

SCALES = ("slide", "cohort")
DZ_TILE, DZ_OVERLAP = 254, 1  # 256-px Deep Zoom tiles, as openslide's own Deep Zoom server
OVERLAY_PX_PER_TILE = 8  # overlay raster resolution: pixels per tile side
OVERLAY_MAX_PX = 8192  # longest side of the overlay raster
GALLERY_PX = 160
TISSUE_RGBA = (0, 190, 90, 70)  # fill; the outline is opaque
OPEN_SLIDES = 8  # Deep Zoom generators (open slide files) kept


class NotFound(LookupError):
    """An id that is not in the run's cohort (served as 404)."""


@dataclass
class SlideView:
    """One slide's tiles, scores and where its pixels come from."""

    slide_id: str
    bag: Bag
    coords: np.ndarray  # [N, 2] level-0 top-left corners (int)
    scores: np.ndarray  # [N] raw ensemble attention, as in `mil heatmap`'s scores CSV
    percentile: np.ndarray  # [N] in [0, 1], within the slide
    tile_size: float  # tile side in level-0 pixels
    width: int  # level-0 size
    height: int
    path: Path | None  # slide file, or None (bags only)
    message: str  # why there is no slide file ("" when there is one)
    class_name: str | None
    probs: dict[str, float]
    attrs: dict
    overlays: dict[str, bytes] = field(default_factory=dict)  # scale -> PNG
    tissue_png: bytes | None = None

    def summary(self) -> dict:
        """JSON for the slide page: geometry, tiles and scores."""
        return {
            "slide_id": self.slide_id, "bag_id": self.bag.bag_id, "patient_id": self.bag.patient_id,
            "other_slides": [s for s in self.bag.slide_ids if s != self.slide_id],
            "width": self.width, "height": self.height, "tile_size": self.tile_size,
            "has_slide": self.path is not None, "message": self.message,
            "x": self.coords[:, 0].tolist(), "y": self.coords[:, 1].tolist(),
            "score": [float(f"{s:.6g}") for s in self.scores],
            "percentile": [round(float(p), 4) for p in self.percentile],
            "class_name": self.class_name, "probs": self.probs,
        }


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def colour_rgba(raster: np.ndarray) -> Image.Image:
    """RGBA image of a [h, w] raster of values in [0, 1] (NaN: transparent), with the heatmap's colour map."""
    rgba = colormaps[CMAP](np.nan_to_num(raster, nan=0.0), bytes=True)
    rgba[..., 3] = np.where(np.isnan(raster), 0, 255)
    return Image.fromarray(rgba, "RGBA")


def colour_stops(n: int = 11) -> list[str]:
    """The overlay's colour map as ``n`` CSS colours from low to high (for the page's colour bar)."""
    rgb = colormaps[CMAP](np.linspace(0.0, 1.0, n), bytes=True)[:, :3]
    return ["#{:02x}{:02x}{:02x}".format(*tuple(int(c) for c in x)) for x in rgb]


def overlay_size(width: int, height: int, tile_size: float) -> tuple[int, int]:
    """Overlay raster (w, h): ``OVERLAY_PX_PER_TILE`` pixels per tile, longest side at most ``OVERLAY_MAX_PX``."""
    scale = min(OVERLAY_PX_PER_TILE / tile_size, OVERLAY_MAX_PX / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class ViewerData:
    """A run, its cohort (with predictions) and lazily built per-slide views; thread-safe."""

    def __init__(self, run_dir: str | Path, overrides: list[str], predictions: str | Path | None = None,
                 top_k: int = 12) -> None:
        self.run: Run = load_run(run_dir)
        self.cfg = heatmap_config(self.run, list(overrides))
        self.cohort = load_cohort(self.cfg.cohort, require_labels=False)
        check_compatible(self.run, self.cohort)
        self.top_k = top_k
        self.bags = {b.bag_id: b for b in self.cohort.bags}
        self.by_slide = {sid: b for b in self.cohort.bags for sid in b.slide_ids}
        self.locator = SlideLocator(self.cfg)
        self.predictions_source, self.predictions = self._read_predictions(predictions)
        self._views: dict[str, SlideView] = {}
        self._rows: dict | None = None
        self._cohort_ref: np.ndarray | None = None  # sorted relative attention of every cohort tile
        self._compute = threading.Lock()  # one attention pass at a time (the models are shared work)
        self._zoom: OrderedDict[str, object] = OrderedDict()
        self._zoom_lock = threading.Lock()

    # ------------------------------------------------------------ cohort
    def _read_predictions(self, path: str | Path | None) -> tuple[str, pd.DataFrame | None]:
        """The predictions to show: ``path``, else the run's own (out-of-fold) ones when the cohort is the run's."""
        same_cohort = OmegaConf.to_container(self.cfg.cohort) == OmegaConf.to_container(self.run.config.cohort)
        if path is None:
            if not same_cohort or not (self.run.path / "predictions.csv").is_file():
                return ("none: the cohort is not the run's own; pass --predictions with `mil predict`'s "
                        "predictions.csv for it"), None
            path = self.run.path / "predictions.csv"
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--predictions {path}: no such file")
        df = pd.read_csv(path, dtype={self.cfg.cohort.patient_column: str, self.cfg.cohort.slide_column: str})
        if self.cfg.cohort.patient_column not in df.columns:
            raise ValueError(f"{path}: no {self.cfg.cohort.patient_column!r} column; is it a predictions.csv?")
        return str(path), df

    def _prediction_row(self, bag: Bag) -> dict | None:
        df = self.predictions
        if df is None:
            return None
        c = self.cfg.cohort
        if c.bag_level == "slide" and c.slide_column in df.columns:
            rows = df[df[c.slide_column] == bag.slide_ids[0]]
        else:
            rows = df[df[c.patient_column] == bag.patient_id]
        return None if rows.empty else rows.iloc[0].to_dict()

    def cohort_rows(self) -> dict:
        """JSON for the cohort page: one row per bag with label, fold, probability and called class (built once)."""
        if self._rows is None:
            self._rows = self._cohort_rows()
        return self._rows

    def _cohort_rows(self) -> dict:
        classes = self.run.classes if str(self.run.config.task.type) == "classification" else []
        positive = classes[-1] if classes else None
        rows = []
        for bag in self.cohort.bags:
            pred = self._prediction_row(bag) or {}
            probs = {c: float(pred[f"prob_{c}"]) for c in classes if pd.notna(pred.get(f"prob_{c}"))}
            called = max(probs, key=probs.get) if len(probs) == len(classes) and probs else None
            others = {k: v for k, v in pred.items() if k.startswith(("pred", "risk")) and pd.notna(v)}
            rows.append({
                "bag_id": bag.bag_id, "patient_id": bag.patient_id, "slides": bag.slide_ids,
                "label": bag.label, "fold": None if pd.isna(pred.get("fold", np.nan)) else str(pred["fold"]),
                "prob": probs.get(positive), "called": called, "n_tiles": bag.n_tiles,
                "other": {k: (float(v) if isinstance(v, (int, float, np.number)) else str(v)) for k, v in others.items()},
            })
        return {
            "run": str(self.run.path), "model": str(self.run.config.model.name), "n_models": len(self.run.weights),
            "task": str(self.run.config.task.type), "classes": classes, "positive": positive,
            "target": str(self.cfg.cohort.target or ""), "bag_level": str(self.cfg.cohort.bag_level),
            "predictions": self.predictions_source, "rows": rows,
            "skipped": self.cohort.skipped.to_dict("records"),
        }

    # ------------------------------------------------------------ slides
    def bag_of(self, slide_id: str) -> Bag:
        if slide_id not in self.by_slide:
            raise NotFound(slide_id)
        return self.by_slide[slide_id]

    def view(self, slide_id: str) -> SlideView:
        """The slide's scores and geometry, computed on first use (one pass over its bag)."""
        self.bag_of(slide_id)
        if slide_id not in self._views:
            with self._compute:
                if slide_id not in self._views:
                    self._add(slide_attention(self.run, self.cfg, [slide_id]))
        return self._views[slide_id]

    def _add(self, results: list[SlideAttention]) -> None:
        for sa in results:
            if sa.slide_id in self._views:
                continue
            ts = tile_size_level0(sa.attrs, sa.coords, sa.bag_path)
            path, _, looked = self.locator.locate(sa.slide_id, sa.attrs)
            width = int(sa.attrs.get("slide_width", 0)) or math.ceil(sa.coords[:, 0].max() + ts)
            height = int(sa.attrs.get("slide_height", 0)) or math.ceil(sa.coords[:, 1].max() + ts)
            message = ""
            if path is None:
                message = f"slide file not found ({looked})"
            else:
                try:
                    slide = self._open(path)
                    if (slide.dimensions[0], slide.dimensions[1]) != (width, height) and "slide_width" in sa.attrs:
                        message = (f"{path} is {slide.dimensions[0]}x{slide.dimensions[1]} px but the bag was made "
                                   f"from a {width}x{height} px slide: is it the same file?")
                    slide.close()
                except Exception as e:
                    message = f"{path}: {e}"
                if message:
                    path = None
            if message:
                logger.warning("%s: %s; showing the tiles on a blank canvas", sa.slide_id, message)
            self._views[sa.slide_id] = SlideView(
                sa.slide_id, sa.bag, np.asarray(sa.coords).astype(np.int64), sa.scores, percentile_scores(sa.scores),
                ts, width, height, path, message, sa.class_name, sa.probs, sa.attrs)

    def cohort_reference(self) -> np.ndarray:
        """Sorted relative attention (score x bag tiles) of every tile in the cohort; computed once."""
        if self._cohort_ref is None:
            with self._compute:
                if self._cohort_ref is None:
                    todo = [s for s in self.by_slide if s not in self._views]
                    if todo:
                        logger.info("cohort colour scale: attention of %d slides", len(todo))
                        self._add(slide_attention(self.run, self.cfg, todo))
                    self._cohort_ref = np.sort(np.concatenate([self._relative(v) for v in self._views.values()]))
        return self._cohort_ref

    def _relative(self, v: SlideView) -> np.ndarray:
        return v.scores * v.bag.n_tiles

    def shown(self, slide_id: str, scale: str) -> np.ndarray:
        """[N] colour values in [0, 1] on the ``slide`` or ``cohort`` scale (see the module docstring)."""
        v = self.view(slide_id)
        if scale == "slide":
            return v.percentile
        if scale != "cohort":
            raise NotFound(f"scale {scale!r}")
        ref = self.cohort_reference()
        rel = self._relative(v)
        mid = (np.searchsorted(ref, rel, "left") + np.searchsorted(ref, rel, "right") - 1) / 2.0
        return np.clip(mid / max(len(ref) - 1, 1), 0.0, 1.0)

    def overlay_png(self, slide_id: str, scale: str) -> bytes:
        """The attention overlay: an RGBA PNG covering the whole level-0 extent of the slide."""
        v = self.view(slide_id)
        if scale not in v.overlays:
            values = self.shown(slide_id, scale)
            raster = heat_raster(v.coords, values, v.tile_size, (v.width, v.height),
                                 overlay_size(v.width, v.height, v.tile_size))
            v.overlays[scale] = _png(colour_rgba(raster))
        return v.overlays[scale]

    def tissue_png(self, slide_id: str) -> bytes:
        """The tissue mask of extraction (same thumbnail size and detector) as an RGBA PNG over the slide."""
        from encoders.slides import read_thumbnail
        from encoders.tissue import detect_tissue

        v = self.view(slide_id)
        if v.path is None:
            raise NotFound(f"{slide_id}: no slide file, so no tissue mask")
        if v.tissue_png is None:
            slide_mpp = v.attrs.get("slide_mpp") or self.cfg.slides.mpp
            if not slide_mpp:
                raise NotFound(f"{slide_id}: the bag records no slide mpp, so the tissue detector cannot run")
            slide = self._open(v.path)
            try:
                thumb = read_thumbnail(slide, v.path, int(v.attrs.get("thumbnail_px", self.cfg.tiling.thumbnail_px)))
            finally:
                slide.close()
            tissue = detect_tissue(np.asarray(thumb), um_per_px=float(slide_mpp) * v.width / thumb.width)
            if "tissue_threshold" in v.attrs and int(v.attrs["tissue_threshold"]) != tissue.threshold:
                logger.warning("%s: tissue threshold %d differs from extraction's %s", slide_id, tissue.threshold,
                               v.attrs["tissue_threshold"])
            v.tissue_png = _png(mask_rgba(tissue.mask))
        return v.tissue_png

    def gallery(self, slide_id: str) -> dict:
        """Top-k and bottom-k tiles by raw score: indices into the slide's tiles."""
        v = self.view(slide_id)
        k = min(self.top_k, len(v.scores))
        order = np.argsort(-v.scores, kind="stable")
        return {"top": order[:k].tolist(), "bottom": order[::-1][:k].tolist()}

    def tile_jpeg(self, slide_id: str, index: int) -> bytes:
        """Tile ``index`` of the bag, read from the slide at about ``GALLERY_PX`` px."""
        from encoders.slides import read_region

        v = self.view(slide_id)
        if v.path is None or not 0 <= index < len(v.coords):
            raise NotFound(f"{slide_id} tile {index}")
        slide = self._handle(slide_id)[0]
        level = slide.get_best_level_for_downsample(v.tile_size / GALLERY_PX)
        side = max(1, math.ceil(v.tile_size / slide.level_downsamples[level]))
        x, y = (int(c) for c in v.coords[index])
        image = read_region(slide, v.path, (x, y), level, (side, side)).resize((GALLERY_PX, GALLERY_PX))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    # ------------------------------------------------------------ Deep Zoom
    def _open(self, path: Path):
        from encoders.slides import open_slide

        return open_slide(path)

    def _handle(self, slide_id: str) -> tuple[object, object]:
        """(OpenSlide, DeepZoomGenerator) of the slide, kept open for the next requests (LRU)."""
        from openslide.deepzoom import DeepZoomGenerator

        v = self.view(slide_id)
        if v.path is None:
            raise NotFound(f"{slide_id}: {v.message}")
        with self._zoom_lock:
            if slide_id in self._zoom:
                self._zoom.move_to_end(slide_id)
                return self._zoom[slide_id]
        slide = self._open(v.path)
        # limit_bounds=False: Deep Zoom level-0 pixels are the slide's, so the bag's coordinates apply as they are.
        handle = (slide, DeepZoomGenerator(slide, tile_size=DZ_TILE, overlap=DZ_OVERLAP, limit_bounds=False))
        with self._zoom_lock:
            self._zoom[slide_id] = handle
            while len(self._zoom) > OPEN_SLIDES:
                self._zoom.popitem(last=False)[1][0].close()
        return handle

    def deepzoom(self, slide_id: str):
        """The slide's ``openslide.deepzoom.DeepZoomGenerator``."""
        return self._handle(slide_id)[1]

    def dzi(self, slide_id: str) -> str:
        return self.deepzoom(slide_id).get_dzi("jpeg")

    def dz_tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        """One Deep Zoom tile as JPEG; 404 outside the pyramid."""
        gen = self.deepzoom(slide_id)
        if not (0 <= level < gen.level_count):
            raise NotFound(f"level {level}")
        cols, rows = gen.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound(f"tile {col}_{row}")
        tile = gen.get_tile(level, (col, row)).convert("RGB")
        buf = io.BytesIO()
        tile.save(buf, format="JPEG", quality=80)
        return buf.getvalue()

    def close(self) -> None:
        with self._zoom_lock:
            for slide, _ in self._zoom.values():
                slide.close()
            self._zoom.clear()


def mask_rgba(mask: np.ndarray) -> Image.Image:
    """A boolean mask as a translucent fill with an opaque outline."""
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask)
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = TISSUE_RGBA
    rgba[edge] = (*TISSUE_RGBA[:3], 255)
    return Image.fromarray(rgba, "RGBA")


__all__ = ["SCALES", "HeatmapError", "NotFound", "SlideView", "ViewerData", "colour_rgba", "colour_stops", "overlay_size"]
