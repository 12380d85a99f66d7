"""Compose the README figure from a `mil demo` output folder: the cross-validation ROC beside a heatmap.

    python scripts/readme_figure.py demo_output docs/images/demo.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=520)
    args = parser.parse_args()
    pred = pd.read_csv(args.demo_dir / "external" / "predictions.csv", dtype={"patient_id": str})
    top = pred.sort_values("prob_MSI-H", ascending=False).patient_id.iloc[0]  # most confidently positive
    heatmaps = sorted((args.demo_dir / "heatmaps").glob(f"{top}-*_heatmap.png"))
    if not heatmaps:
        raise SystemExit(f"no heatmaps in {args.demo_dir / 'heatmaps'}: run `mil demo --out {args.demo_dir}` first")
    panels = []
    for path in (args.demo_dir / "crossval" / "roc.png", heatmaps[0]):
        im = Image.open(path).convert("RGB")
        panels.append(im.resize((round(im.width * args.height / im.height), args.height), Image.LANCZOS))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 20, args.height), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 20
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({canvas.width}x{canvas.height})")


if __name__ == "__main__":
    main()
