"""``mil extract``: whole-slide images -> one HDF5 bag of tile embeddings per slide.

Per slide: resolve its mpp, detect tissue on a thumbnail, lay an exact-mpp tile grid, keep
tiles with enough tissue and write a QC PNG (:mod:`encoders.prepare`, run one slide ahead in
a background thread), then encode the tiles (reading threads read and preprocess while the
encoder runs) and write the bag atomically. A slide whose complete bag exists is skipped, so a
killed run resumes where it stopped; a failing slide is logged and listed, and the run goes
on. Each shard writes its own summary CSV, so ``n`` processes can share one output folder.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from encoders.models import ENCODERS, TimmEncoder, create_encoder
from encoders.prepare import ExtractOptions, PreparedSlide, prepare_slide
from encoders.reader import SlideTiles, read_batches
from encoders.slides import SlideRef, open_slide, resolve_mpp
from encoders.sources import check_shard, list_slides, shard_slides
from encoders.tiling import plan_tiles
from mil.bags import BagError, read_bag_info, write_bag
from mil.config import require, usable_cores
from mil.io import write_text

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ["features_dir", "encoder.name", "tiling.mpp", "tiling.tile_px", "tiling.min_tissue"]
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
BAG_SUFFIX = ".h5"
# Bag attributes that must match for an existing bag to count as this run's output.
MATCH_ATTRS = ("encoder", "encoder_weights", "embedding", "mpp", "tile_px")


@dataclass
class SlideResult:
    slide_id: str
    status: str  # done, skipped or failed
    n_tiles: int
    reason: str
    path: str
    seconds: float


def bag_path(features_dir: Path, slide_id: str) -> Path:
    return features_dir / f"{slide_id}{BAG_SUFFIX}"


def summary_path(features_dir: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    name = "extract_summary.csv" if n == 1 else f"extract_summary.shard{i}of{n}.csv"
    return features_dir / name


def write_summary(path: Path, results: Sequence[SlideResult]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SlideResult.__dataclass_fields__))
    writer.writeheader()
    for r in results:
        writer.writerow({**asdict(r), "seconds": round(r.seconds, 2)})
    write_text(path, buf.getvalue())


def short_reason(error: BaseException) -> str:
    """One line naming the error: the message's last line (some libraries put a traceback in it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if text.startswith(type(error).__name__) else f"{type(error).__name__}: {text}"


def resolve_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Under torchrun (RANK/WORLD_SIZE set) the default shard becomes (RANK, WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if tuple(shard) == (0, 1) and world > 1:
        shard = (int(os.environ.get("RANK", 0)), world)
    check_shard(tuple(shard))
    return int(shard[0]), int(shard[1])


@contextmanager
def cores_for_readers(device: torch.device, readers: int) -> Iterator[None]:
    """On the CPU, leave one core per reading thread: oversubscribed BLAS threads stall badly."""
    before = torch.get_num_threads()
    if device.type == "cpu" and readers > 0:
        torch.set_num_threads(max(1, min(before, usable_cores() - readers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_tiles(tiles: SlideTiles, encoder: TimmEncoder, batch_size: int, readers: int, desc: str) -> np.ndarray:
    """Embeddings ``[N, embed_dim]`` of a slide's tiles, read by ``readers`` threads (0: this thread)."""
    features = np.empty((len(tiles), encoder.embed_dim), np.float32)
    # closing(): on an encoder error the readers stop here, before the caller closes their slide handles
    with tqdm(total=len(tiles), desc=desc, unit="tile", leave=False, disable=None) as bar, \
            closing(read_batches(tiles, batch_size, readers)) as batches:
        for start, batch in batches:
            # [n, H, W, 3] -> a [n, 3, H, W] view; `normalize` lays it out once, on the device
            features[start : start + len(batch)] = encoder.encode_uint8(batch.permute(0, 3, 1, 2)).cpu().numpy()
            bar.update(len(batch))
    return features


def slide_geometry(ref: SlideRef, opt: ExtractOptions) -> dict[str, float]:
    """The resolved level-0 mpp of a slide and the level-0 size of its tiles under ``opt``.

    Raises :class:`SlideError` when the slide cannot be opened or has no resolution.
    """
    with closing(open_slide(ref.path)) as slide:
        mpp, _ = resolve_mpp(slide, ref, opt.mpp_fallback)
        plan = plan_tiles(mpp, opt.target_mpp, opt.tile_px, slide.level_downsamples)
    return {"slide_mpp": plan.slide_mpp, "tile_size_level0": plan.tile_size_level0}


def _existing_bag(path: Path, expected: dict, geometry: dict[str, float] | None = None) -> SlideResult | str | None:
    """None: (re)extract. A string: why the existing bag conflicts. Else the skip result.

    Besides the encoder and tiling settings (``expected``), the slide's resolved resolution and
    level-0 tile size (``geometry``) must match: a slide without mpp metadata extracted with
    another ``slides.mpp`` covers other tissue per tile.
    """
    try:
        info = read_bag_info(path)
    except BagError as e:
        logger.warning("%s; extracting again", e)
        return None
    diff = [f"{k}={info.attrs.get(k)!r} (this run: {expected[k]!r})" for k in MATCH_ATTRS
            if str(info.attrs.get(k)) != str(expected[k])]
    for key, value in (geometry or {}).items():
        recorded = info.attrs.get(key)
        if recorded is None or not math.isclose(float(recorded), value, rel_tol=1e-6):
            diff.append(f"{key}={recorded!r} (this run: {value!r})")
    if diff:
        return (f"existing bag {path} was made differently: {', '.join(diff)}; "
                f"use another features_dir or delete it")
    return SlideResult("", SKIPPED, info.n_tiles, "complete bag exists", "", 0.0)


def _remove_stale_temporaries(path: Path) -> None:
    # A killed writer leaves `.<name>.tmp<pid>`; this shard owns the slide, so none is live.
    for tmp in glob.glob(glob.escape(str(path.parent / f".{path.name}.tmp")) + "*"):
        Path(tmp).unlink(missing_ok=True)


def prepare_or_skip(ref: SlideRef, opt: ExtractOptions, out: Path, expected: dict,
                    defer_qc: Callable[[Callable[[], None]], None] | None = None) -> SlideResult | PreparedSlide:
    """Skip a slide with a complete bag, or prepare it; never raises (failures become results).

    ``defer_qc``: see :func:`encoders.prepare.prepare_slide`.
    """
    start = time.perf_counter()
    path = bag_path(out, ref.slide_id)
    if path.exists():
        def result(status: str, n: int = 0, reason: str = "") -> SlideResult:
            return SlideResult(ref.slide_id, status, n, reason, str(ref.path), time.perf_counter() - start)

        try:
            geometry = slide_geometry(ref, opt)
        except Exception as e:  # the slide itself fails: report it as a failed slide
            return _failed(ref, e, time.perf_counter() - start)
        existing = _existing_bag(path, expected, geometry)
        if isinstance(existing, str):
            logger.error("slide %s: %s", ref.slide_id, existing)
            return result(FAILED, reason=existing)
        if existing is not None:
            return result(SKIPPED, existing.n_tiles, existing.reason)
    return prepare_new(ref, opt, out, defer_qc)


def prepare_new(ref: SlideRef, opt: ExtractOptions, out: Path,
                defer_qc: Callable[[Callable[[], None]], None] | None = None) -> SlideResult | PreparedSlide:
    """Prepare a slide whose bag is missing or to be made again; never raises (failures become results)."""
    start = time.perf_counter()
    _remove_stale_temporaries(bag_path(out, ref.slide_id))
    try:
        return prepare_slide(ref, opt, out / "qc", defer_qc)
    except Exception as e:  # one bad slide must not stop the run
        return _failed(ref, e, time.perf_counter() - start)


def encode_slide(prep: PreparedSlide, encoder: TimmEncoder, opt: ExtractOptions, out: Path) -> SlideResult:
    """Encode a prepared slide and write its bag; never raises (failures become results)."""
    start = time.perf_counter()
    ref = prep.ref
    tiles = SlideTiles(ref.path, prep.coords, prep.plan, encoder.transform, pin_memory=encoder.device.type == "cuda")
    try:
        features = encode_tiles(tiles, encoder, opt.batch_size, opt.workers, ref.slide_id)
        attrs = {**encoder.bag_attrs(), **prep.bag_attrs(opt.min_tissue, opt.thumbnail_px)}
        write_bag(bag_path(out, ref.slide_id), features, prep.coords, attrs)
    except Exception as e:  # one bad slide must not stop the run
        return _failed(ref, e, prep.seconds + time.perf_counter() - start)
    finally:
        tiles.close()
    seconds = prep.seconds + time.perf_counter() - start
    logger.info("slide %s: %d tiles in %.1f s", ref.slide_id, len(prep.coords), seconds)
    return SlideResult(ref.slide_id, DONE, len(prep.coords), "", str(ref.path), seconds)


def _failed(ref: SlideRef, error: Exception, seconds: float) -> SlideResult:
    reason = short_reason(error)
    logger.error("slide %s failed: %s", ref.slide_id, reason)
    logger.debug("slide %s traceback", ref.slide_id, exc_info=True)
    return SlideResult(ref.slide_id, FAILED, 0, reason, str(ref.path), seconds)


def extract_slides(refs: Sequence[SlideRef], load_encoder: Callable[[], TimmEncoder], opt: ExtractOptions,
                   out: Path) -> Iterator[SlideResult]:
    """Results slide by slide; a background thread prepares the next slide while this one is encoded.

    The first slide is prepared while ``load_encoder`` runs (Virchow2's 632M weights take
    seconds), unless its bag exists: whether to skip it depends on the encoder. The same
    thread renders each slide's QC PNG: neither is needed to encode the slide's tiles, so
    both overlap its encoding instead of delaying it.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="slide-prep") as pool:
        upcoming: list[Future | None] = []
        qc: list[list[Callable[[], None]]] = []  # per slide: its deferred QC rendering
        expected: dict = {}

        def start(i: int) -> None:
            if i < len(refs):
                qc.append([])
                if expected:  # the encoder is loaded: an existing bag can be checked and skipped
                    upcoming.append(pool.submit(prepare_or_skip, refs[i], opt, out, expected, qc[i].append))
                else:  # the encoder is loading: only a slide without a bag is prepared
                    upcoming.append(pool.submit(prepare_new, refs[i], opt, out, qc[i].append))

        if refs and not bag_path(out, refs[0].slide_id).exists():
            start(0)
        encoder = load_encoder()
        expected.update({**encoder.bag_attrs(), "mpp": opt.target_mpp, "tile_px": opt.tile_px})
        if not upcoming:
            start(0)
        with cores_for_readers(encoder.device, opt.workers):
            for i in range(len(refs)):
                item = upcoming[i].result()  # type: ignore[union-attr]
                upcoming[i] = None  # let the prepared slide be freed
                start(i + 1)
                if isinstance(item, PreparedSlide):
                    while qc[i]:
                        pool.submit(_write_qc, refs[i], qc[i].pop())
                    yield encode_slide(item, encoder, opt, out)
                else:
                    while qc[i]:  # a failed slide's error points to its QC PNG: write it first
                        _write_qc(refs[i], qc[i].pop())
                    yield item


def _write_qc(ref: SlideRef, write: Callable[[], None]) -> None:
    try:
        write()
    except Exception as e:  # a QC image must not fail the slide, whose bag is fine
        logger.warning("slide %s: QC image not written (%s)", ref.slide_id, short_reason(e))


def run_extract(cfg: DictConfig, shard: tuple[int, int] = (0, 1)) -> Path:
    """Extract every slide of this shard; returns the shard's summary CSV path."""
    require(cfg, REQUIRED_KEYS, "extract")
    shard = resolve_shard(shard)
    refs = shard_slides(list_slides(cfg.slides), shard)
    opt = ExtractOptions.from_config(cfg)
    out = Path(cfg.features_dir)
    summary = summary_path(out, shard)
    spec = ENCODERS.get(cfg.encoder.name)
    weights = cfg.encoder.weights if cfg.encoder.weights is not None else spec.default_weights

    results: list[SlideResult] = []

    def load_encoder() -> TimmEncoder:
        encoder = create_encoder(spec.name, weights, embedding=cfg.encoder.embedding,
                                 device=cfg.encoder.device, precision=cfg.encoder.precision)
        logger.info("shard %d/%d: %d slides -> %s with %r", shard[0], shard[1], len(refs), out, encoder)
        write_summary(summary, results)  # the first file of the run: a weights error leaves none
        return encoder

    bar = tqdm(total=len(refs), desc=f"slides (shard {shard[0]}/{shard[1]})", unit="slide", disable=None)
    with bar:
        for result in extract_slides(refs, load_encoder, opt, out):
            results.append(result)
            write_summary(summary, results)  # kept current, so a killed run still has one
            bar.update()
    counts = {s: sum(r.status == s for r in results) for s in (DONE, SKIPPED, FAILED)}
    logger.info("extract finished: %s; summary %s", ", ".join(f"{v} {k}" for k, v in counts.items()), summary)
    return summary
