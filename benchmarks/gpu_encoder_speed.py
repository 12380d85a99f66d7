"""Tile encoder throughput on a GPU: tiles/s of ``encode_uint8`` in bf16 and fp16 autocast.

Measures what `mil extract` does per batch: a pinned uint8 batch is copied to the GPU,
normalised, encoded (all tokens -> the official embedding) and copied back. Weights are
random (the speed is the same). Needs only torch + timm; on an H100/H200 it takes about a
minute:

    python benchmarks/gpu_encoder_speed.py --out results/gpu_encoder_speed.json

Writes the JSON and a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
from encoders import create_encoder


def measure(encoder, batch_size: int, seconds: float, warmup: int) -> dict:
    batch = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)
    if encoder.device.type == "cuda":
        batch = batch.pin_memory()
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(warmup):
            out = encoder.encode_uint8(batch).cpu()
        iters, start = 0, time.perf_counter()
        while iters < 3 or time.perf_counter() - start < seconds:
            out = encoder.encode_uint8(batch).cpu()  # .cpu() syncs, as the pipeline does per batch
            iters += 1
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch_size": batch_size, "error": "out of memory"}
    row = {
        "batch_size": batch_size,
        "tiles_per_s": round(iters * batch_size / elapsed, 1),
        "ms_per_batch": round(1000 * elapsed / iters, 2),
        "iters": iters,
        "finite": bool(torch.isfinite(out).all()),
        "embed_dim": int(out.shape[1]),
    }
    if encoder.device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (a .md is written beside it)")
    parser.add_argument("--encoder", default="virchow2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible; this benchmark is for a GPU machine (--device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: what a user would get by default on Ampere+
    torch.backends.cudnn.allow_tf32 = True

    start = time.perf_counter()
    encoder = create_encoder(args.encoder, weights=None, device=args.device)
    build_s = time.perf_counter() - start
    rows = []
    for precision in args.precisions:
        encoder.precision = precision
        for bs in args.batch_sizes:
            row = {"precision": precision, **measure(encoder, bs, args.seconds, args.warmup)}
            print(json.dumps(row), flush=True)
            rows.append(row)

    device = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else platform.processor()
    import timm

    result = {
        "benchmark": "gpu_encoder_speed",
        "encoder": args.encoder,
        "embedding": encoder.embedding,
        "params_m": round(sum(p.numel() for p in encoder.model.parameters()) / 1e6, 1),
        "device": device,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model_build_s": round(build_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    ok = [r for r in rows if "tiles_per_s" in r]
    best = max(ok, key=lambda r: r["tiles_per_s"]) if ok else None
    lines = [
        f"# {args.encoder} tile encoding on {device}",
        "",
        f"{result['params_m']}M parameters, embedding {encoder.embedding} ({encoder.embed_dim}-d), random weights; "
        f"torch {torch.__version__}, timm {timm.__version__}. uint8 batch (pinned) -> GPU -> embeddings -> CPU.",
        "",
        "| precision | batch | tiles/s | ms/batch | peak GiB | finite |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {r['precision']} | {r['batch_size']} | {r.get('tiles_per_s', r.get('error'))} | "
          f"{r.get('ms_per_batch', '')} | {r.get('peak_mem_gib', '')} | {r.get('finite', '')} |" for r in rows],
        "",
        f"Best: {best['tiles_per_s']:.0f} tiles/s ({best['precision']}, batch {best['batch_size']})" if best else "",
        f"Total time {result['total_s']} s (model build {result['model_build_s']} s).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
