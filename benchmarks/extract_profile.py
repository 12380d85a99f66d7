"""CPU seconds of each step `mil extract` takes for one slide, beside the plain read loop.

Where `benchmarks/extract_speed.py` gives the end-to-end ratio, this splits one slide's work
into the steps the plain loop also does (``read_region`` + convert + resize of every kept tile)
and the ones it does not: the transparency check of ``read_tile``, the uint8 batches,
``encode_tiles`` with 0 and 1 reading threads (encoder replaced by zeros, as with ``--no-encode``), and the
per-slide thumbnail, tissue detection, tissue fractions and QC PNG. Each step runs ``--repeats``
times, interleaved; the table gives the median and the minimum of the process CPU time (all
threads included).

    python benchmarks/extract_profile.py --out /tmp/extract_profile.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
from benchmarks.extract_speed import CMU, build_mosaic, cpu_seconds
from encoders.extract import encode_tiles
from encoders.models import ENCODERS, create_encoder
from encoders.prepare import ExtractOptions, prepare_slide
from encoders.reader import SlideTiles, read_batches
from encoders.slides import SlideRef, open_slide, read_thumbnail
from encoders.tiling import grid_coords, read_tile, tissue_fraction
from encoders.tissue import detect_tissue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--slide", type=Path, help="a slide to use instead of the CMU mosaic")
    parser.add_argument("--mosaic", type=int, nargs=2, default=[6, 4], help="CMU copies across and down")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--thumbnail-px", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="extract_profile_"))
    try:
        path = args.slide or build_mosaic(work / "mosaic.tiff", CMU, tuple(args.mosaic))
        opt = ExtractOptions(args.mpp, 224, 0.5, args.thumbnail_px, 64, 0, None)
        qc: list[Callable[[], None]] = []
        prep = prepare_slide(SlideRef("slide", path), opt, work / "qc", defer_qc=qc.append)
        spec = ENCODERS.get("random-vit-tiny")
        encoder = create_encoder(spec.name, spec.default_weights, device="cpu", precision="fp32")
        encoder.encode_uint8 = lambda images: torch.zeros(len(images), encoder.embed_dim)  # type: ignore[method-assign]
        plan, coords = prep.plan, prep.coords
        with open_slide(path) as slide:
            thumb = read_thumbnail(slide, path, args.thumbnail_px)
            width, height = slide.dimensions
        um_per_px = prep.plan.slide_mpp * width / thumb.width
        mask = detect_tissue(np.asarray(thumb), um_per_px).mask
        grid = grid_coords(width, height, plan.tile_size_level0)

        def plain() -> None:
            size, n = plan.read_size, math.ceil(plan.read_size - 1e-6)
            with openslide.OpenSlide(path) as s:
                for x, y in coords:
                    s.read_region((int(x), int(y)), plan.level, (n, n)).convert("RGB").resize(
                        (224, 224), Image.Resampling.BICUBIC, box=(0.0, 0.0, size, size))

        def tiles() -> None:
            with open_slide(path) as s:
                for x, y in coords:
                    read_tile(s, path, int(x), int(y), plan)

        def batches() -> None:
            items = SlideTiles(path, coords, plan, encoder.transform)
            for _ in read_batches(items, 64, 0):
                pass
            items.close()

        def encoded(readers: int) -> Callable[[], None]:
            def run() -> None:
                items = SlideTiles(path, coords, plan, encoder.transform)
                encode_tiles(items, encoder, 64, readers, "x")
                items.close()
            return run

        def thumbnail() -> None:
            with open_slide(path) as s:
                read_thumbnail(s, path, args.thumbnail_px)

        steps: dict[str, Callable[[], object]] = {
            "tiles: read_region + convert + resize (the plain loop)": plain,
            "tiles: read_tile (transparency check, background)": tiles,
            "tiles: read_tile + to_array into batches (SlideTiles)": batches,
            "tiles: encode_tiles, 0 reading threads, zeros for the encoder": encoded(0),
            "tiles: encode_tiles, 1 reading thread, zeros for the encoder": encoded(1),
            "slide: thumbnail": thumbnail,
            "slide: tissue detection": lambda: detect_tissue(np.asarray(thumb), um_per_px),
            "slide: tissue fraction of the grid": lambda: tissue_fraction(grid, plan.tile_size_level0, mask,
                                                                          (width, height)),
            "slide: QC PNG (render and write)": qc[0],
        }
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = cpu_seconds()
                step()
                seconds[name].append(cpu_seconds() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [{"step": name, "median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3),
             "runs_s": [round(x, 3) for x in v]} for name, v in seconds.items()]
    result = {"benchmark": "extract_profile", "command": " ".join(["python", *sys.argv]),
              "slide": str(args.slide or f"mosaic of {CMU.name}"), "tiles": len(coords), "grid": len(grid),
              "thumbnail": list(thumb.size), "repeats": args.repeats, "steps": rows,
              "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_before": load_before,
                          "loadavg_after": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['command']}: {len(coords)} tiles, thumbnail {thumb.size}, CPU seconds over {args.repeats} runs")
    for r in rows:
        print(f"{r['step']:58s} median {r['median_s']:6.3f}  min {r['min_s']:6.3f}")
    print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
