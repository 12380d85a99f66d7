"""Training speed on a slide-scale synthetic cohort: CLAM-style loop vs the toolkit's defaults.

On one synthetic cohort (default 200 bags x 4,000 tiles x 2,560-d float16 with a planted
signal, ``mil.synthetic``) and one train/validation split, in one run:

* (a) ``clam``: batch size 1, full bags, float32 (the CLAM-style loop);
* (b) ``toolkit``: the defaults (``train.bag_size=512`` tiles sampled per bag, 8 bags per step)
  with bf16 autocast when a micro-benchmark on this CPU shows it is faster than float32;

each measured in its own subprocess (so peak RSS is its own): training epoch time, slides/s,
validation time, peak RSS and the validation AUROC of the epoch chosen on validation loss.
Then the data-loading overhead of (b): its epoch time against the same steps on batches
preloaded in memory, and the loader alone (before / after the sampled-read fix in
``mil.data``). Finally one bag of 100,000 tiles is trained (sampled and full-bag steps) and
evaluated, and its peak RSS checked against 8 GiB.

    python benchmarks/train_speed.py            # the full run (~15 min on 1 CPU thread)
    python benchmarks/train_speed.py --small    # a quick check (~1 min)

Torch uses one thread (``--threads``); the markdown table goes to ``<work-dir>/train_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def torch_no_grad(fn):
    def wrapped(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # ru_maxrss is KiB on Linux


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mil"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_cohort(args: argparse.Namespace) -> Path:
    """The synthetic cohort, reused when one of the same shape exists."""
    from mil.synthetic import make_synthetic_cohort

    out = args.work_dir / f"cohort_{args.bags}x{args.tiles}x{args.dim}"
    if not (out / "slides.csv").is_file():
        t0 = time.perf_counter()
        make_synthetic_cohort(out, n_patients=args.bags, slides_per_patient=(1, 1),
                              tiles_per_slide=(args.tiles, args.tiles), dim=args.dim, positive_fraction=0.5,
                              signal_fraction=0.05, seed=0)
        print(f"cohort written to {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def config(cohort: Path, case: str, args: argparse.Namespace, precision: str):
    from mil.config import load_config

    epochs = args.epochs if case == "clam" or not args.toolkit_epochs else args.toolkit_epochs
    common = [
        f"cohort.clinical_csv={cohort / 'clinical.csv'}", f"cohort.slide_csv={cohort / 'slides.csv'}",
        f"cohort.features_dir={cohort / 'features'}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]",
        f"train.max_epochs={epochs}", f"train.min_epochs={epochs}", f"train.patience={epochs}",
        "trainer.accelerator=cpu", "trainer.logger=none", "trainer.enable_progress_bar=false",
        f"output_dir={args.work_dir / case}",
    ]
    if case == "clam":
        return load_config([*common, "train.batch_size=1", "train.bag_size=null", "train.precision=32-true"])
    return load_config([*common, f"train.precision={precision}", *args.toolkit_overrides])  # toolkit defaults otherwise


def bf16_helps(dim: int, bag_size: int, batch: int) -> dict:
    """Time one training step of the default model in float32 and under bf16 autocast."""
    import torch

    from mil.models import create_model

    model = create_model("gated_abmil", dim, 2)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x, mask, y = torch.randn(batch, bag_size, dim), torch.ones(batch, bag_size, dtype=torch.bool), torch.zeros(batch, dtype=torch.long)
    result = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                logits = model(x, mask).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        result[name] = sorted(times[1:])[1]  # median of the warm steps
    return result


def instrument_epochs(times: dict) -> None:
    """Record training / validation phase times through MILModule's epoch hooks (benchmark only)."""
    from mil.training import MILModule

    def wrap(name: str, key: str) -> None:
        original = getattr(MILModule, name)

        def hook(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            times.setdefault(key, []).append(time.perf_counter())
            return result

        setattr(MILModule, name, hook)

    wrap("on_train_epoch_start", "train_start")
    wrap("on_validation_epoch_start", "val_start")
    wrap("on_validation_epoch_end", "val_end")


@torch_no_grad
def val_auroc(model, bags, labels) -> float:
    """AUROC of full validation bags (float32), independent of the training precision."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from mil.bags import read_features

    model.eval()
    scores = []
    for bag in bags:
        x = torch.from_numpy(np.concatenate([read_features(p) for p in bag.paths])).float()[None]
        scores.append(float(model(x, None).logits.float().softmax(-1)[0, -1]))
    return float(roc_auc_score(labels, scores))


def run_case(case: str, args: argparse.Namespace) -> dict:
    """One ``mil train`` run (a subprocess of the main run): timings, AUROC, peak RSS."""
    import shutil

    import numpy as np
    from omegaconf import OmegaConf

    from mil.cohort import load_cohort
    from mil.crossval import load_run_model, run_train

    cohort_dir = make_cohort(args)
    cfg = config(cohort_dir, case, args, args.precision)
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # a finished run would be kept, not retrained
    times: dict = {}
    instrument_epochs(times)
    t0 = time.perf_counter()
    run_train(cfg)
    total = time.perf_counter() - t0
    split = OmegaConf.load(out / "splits.yaml")[0]
    cohort = load_cohort(cfg.cohort)
    train_bags, val_bags = cohort.subset(set(split.train)), cohort.subset(set(split.val))
    model = load_run_model(out, out / "model.safetensors")
    labels = [b.label == cohort.classes[-1] for b in val_bags]
    train_s = [v - s for s, v in zip(times["train_start"], times["val_start"], strict=True)]  # validation closes each epoch
    val_s = [e - s for s, e in zip(times["val_start"], times["val_end"], strict=True)]
    summary = json.loads((out / "summary.json").read_text())
    result = {
        "case": case, "precision": cfg.train.precision, "batch_size": cfg.train.batch_size,
        "bag_size": cfg.train.bag_size, "n_train": len(train_bags), "n_val": len(val_bags),
        "epochs": len(train_s), "epoch_s": float(np.median(train_s)), "epoch_s_all": train_s,
        "val_s": float(np.median(val_s)), "slides_per_s": len(train_bags) / float(np.median(train_s)),
        "fit_s": total, "best_epoch": summary.get("best_epoch"), "val_auroc": val_auroc(model, val_bags, labels),
    }
    if case == "toolkit":
        result.update(loading_overhead(cfg, model, train_bags, labels_of(cohort, train_bags), result["epoch_s"]))
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def labels_of(cohort, bags):
    import torch

    return torch.tensor([cohort.classes.index(b.label) for b in bags])


def loading_overhead(cfg, model, train_bags, y_train, epoch_s: float) -> dict:
    """Pure compute on preloaded batches vs the measured epoch; the loader alone, before/after the fix."""
    import torch

    from mil.data import BagDataset, make_loader

    def loader_epoch(dataset) -> tuple[float, list]:
        torch.manual_seed(1)
        t0 = time.perf_counter()
        batches = list(make_loader(dataset, cfg.train.batch_size, shuffle=True))
        return time.perf_counter() - t0, batches

    class Legacy(BagDataset):  # the read path before the fix: whole bag read and checked, then sampled
        def _fits_cache(self, bag):
            return True

    before_s, _ = loader_epoch(Legacy(train_bags, y_train, cfg.train.bag_size, cache_bytes=0))
    after_s, batches = loader_epoch(BagDataset(train_bags, y_train, cfg.train.bag_size))
    # The same steps as a training epoch (forward, cross-entropy, backward, AdamW) on batches in memory.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    bf16 = cfg.train.precision.startswith("bf16")
    t0 = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["features"].float(), batch["mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    compute_s = time.perf_counter() - t0
    return {"compute_s": compute_s, "loading_share": 1 - compute_s / epoch_s,
            "loader_only_s_before_fix": before_s, "loader_only_s": after_s}


def big_bag_path(args: argparse.Namespace) -> Path:
    return args.work_dir / f"big_{args.big_tiles}x{args.dim}.h5"


def make_big_bag(args: argparse.Namespace) -> Path:
    """One bag of ``--big-tiles`` tiles (written by the parent, so the child's peak RSS is its own)."""
    import numpy as np

    from mil.bags import write_bag
    from mil.synthetic import signal_direction

    path = big_bag_path(args)
    if not path.is_file():
        rng = np.random.default_rng(0)
        x = np.empty((args.big_tiles, args.dim), np.float16)
        for start in range(0, args.big_tiles, 10_000):  # in chunks: a float32 draw of it all is 2x the bag
            stop = min(start + 10_000, args.big_tiles)
            x[start:stop] = rng.standard_normal((stop - start, args.dim), dtype=np.float32)
        x[::20] += (5 * signal_direction(args.dim)).astype(np.float16)
        write_bag(path, x, attrs={"encoder": "synthetic"})
    return path


def run_big_bag(args: argparse.Namespace) -> dict:
    """Train (sampled and full-bag steps) and evaluate one bag of ``--big-tiles`` tiles."""
    import torch

    from mil.bags import read_bag_info
    from mil.cohort import Bag
    from mil.data import BagDataset, make_loader
    from mil.inference import predict_bags
    from mil.models import create_model

    path = big_bag_path(args)
    rss_before = peak_rss_gib()
    info = read_bag_info(path)
    bag = Bag("big", "big", ["big"], [path], "1", info.n_tiles)
    model = create_model("gated_abmil", args.dim, 2)
    opt = torch.optim.AdamW(model.parameters(), 2e-4)
    out = {"tiles": info.n_tiles, "dim": info.dim, "file_gib": path.stat().st_size / GiB, "rss_before_gib": rss_before}
    for name, bag_size, steps in (("train_sampled", 512, 5), ("train_full_bag", None, 1)):
        loader = make_loader(BagDataset([bag] * steps, torch.ones(steps, dtype=torch.long), bag_size), 1, shuffle=False)
        t0 = time.perf_counter()
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(batch["features"].float(), batch["mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[f"{name}_s_per_step"] = (time.perf_counter() - t0) / steps
        out[f"peak_rss_gib_after_{name}"] = peak_rss_gib()
    t0 = time.perf_counter()
    predict_bags(model, [bag], 1, "cpu", "bf16-mixed")
    out["eval_s"] = time.perf_counter() - t0
    out["peak_rss_gib"] = peak_rss_gib()
    out["within_8_gib"] = out["peak_rss_gib"] <= 8
    return out


def child(what: str, args: argparse.Namespace) -> dict:
    """Run ``what`` in a fresh interpreter (own peak RSS), passing the options on."""
    cmd = [sys.executable, __file__, "--child", what, "--work-dir", str(args.work_dir), "--bags", str(args.bags),
           "--tiles", str(args.tiles), "--dim", str(args.dim), "--epochs", str(args.epochs),
           "--big-tiles", str(args.big_tiles), "--threads", str(args.threads), "--precision", args.precision,
           "--toolkit-epochs", str(args.toolkit_epochs or args.epochs), "--toolkit-overrides", *args.toolkit_overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, bench, a, b, big, load) -> str:
    rows = [(f"(a) CLAM-style: batch 1, full bags, fp32, {a['epochs']} epochs", a),
            (f"(b) toolkit defaults: batch {b['batch_size']}, {b['bag_size']} tiles/bag, {b['precision']}, "
             f"{b['epochs']} epochs{' (' + ' '.join(args.toolkit_overrides) + ')' if args.toolkit_overrides else ''}", b)]
    lines = [
        f"Cohort: {args.bags} bags x {args.tiles} tiles x {args.dim}-d float16 (synthetic, planted signal); "
        f"{a['n_train']} training / {a['n_val']} validation bags; gated_abmil; "
        f"{args.threads} torch thread(s); load average at start {load:.2f}.",
        "",
        "| loop | train epoch (s) | slides/s | validation pass (s) | training, all epochs (s) | peak RSS (GiB) | val AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['epoch_s']:.1f} | {r['slides_per_s']:.2f} | {r['val_s']:.1f} | {sum(r['epoch_s_all']):.0f} | "
              f"{r['peak_rss_gib']:.2f} | {r['val_auroc']:.3f} |" for name, r in rows]
    lines += [
        "",
        f"Speed-up of (b) over (a): **{a['epoch_s'] / b['epoch_s']:.1f}x** per training epoch, "
        f"**{sum(a['epoch_s_all']) / sum(b['epoch_s_all']):.1f}x** in total training time "
        f"(AUROC {b['val_auroc']:.3f} vs {a['val_auroc']:.3f}).",
        f"bf16 autocast micro-benchmark (one step, {b['batch_size']} x {b['bag_size'] or args.tiles} x {args.dim}): "
        f"fp32 {bench['fp32']:.3f} s, bf16 {bench['bf16']:.3f} s -> (b) uses {b['precision']}.",
        f"Data loading in (b): epoch {b['epoch_s']:.1f} s vs {b['compute_s']:.1f} s of pure compute on preloaded "
        f"batches: loading + framework overhead = **{100 * b['loading_share']:.0f}%** of the epoch. Loader alone: "
        f"{b['loader_only_s']:.1f} s per epoch (was {b['loader_only_s_before_fix']:.1f} s before the sampled-read fix).",
        f"{big['tiles']:,}-tile bag ({big['tiles']} x {big['dim']}, {big['file_gib']:.2f} GiB on disk): sampled training step "
        f"{big['train_sampled_s_per_step']:.2f} s, full-bag training step {big['train_full_bag_s_per_step']:.1f} s, "
        f"evaluation {big['eval_s']:.1f} s; peak RSS **{big['peak_rss_gib']:.2f} GiB** "
        f"({'within' if big['within_8_gib'] else 'OVER'} 8 GiB).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="quick run: 40 bags x 1,000 tiles x 384-d, 20,000-tile big bag")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/benchmarks/speed")
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--tiles", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--big-tiles", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="precision of (b): auto (bf16 if faster), 32-true, bf16-mixed")
    parser.add_argument("--toolkit-epochs", type=int, help="epochs of (b) (default: --epochs)")
    parser.add_argument("--toolkit-overrides", nargs="*", default=[], help="extra config overrides for (b)")
    parser.add_argument("--cases", nargs="+", default=["toolkit", "clam", "big"], choices=["toolkit", "clam", "big"],
                        help="what to run; the others are taken from an earlier run's train_speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.bags, args.tiles, args.dim, args.epochs, args.big_tiles = 40, 1000, 384, 3, 20_000
    args.work_dir = args.work_dir.resolve()
    import torch

    torch.set_num_threads(args.threads)
    quiet()
    if args.child:
        result = run_big_bag(args) if args.child == "big" else run_case(args.child, args)
        print(json.dumps(result))
        return 0

    load = os.getloadavg()[0]
    make_cohort(args)
    make_big_bag(args)
    bench = bf16_helps(args.dim, 512, 8)
    if args.precision == "auto":
        args.precision = "bf16-mixed" if bench["bf16"] < bench["fp32"] else "32-true"
    saved = args.work_dir / "train_speed.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    results.pop("bf16_bench", None)
    for what in args.cases:
        t0 = time.perf_counter()
        results[what] = child(what, args)
        print(f"{what}: {time.perf_counter() - t0:.0f} s {json.dumps(results[what])}", flush=True)
    missing = [k for k in ("toolkit", "clam", "big") if k not in results]
    if missing:
        raise SystemExit(f"no results for {missing} in {saved}: run them (--cases {' '.join(missing)})")
    text = report(args, bench, results["clam"], results["toolkit"], results["big"], load)
    saved.write_text(json.dumps({"bf16_bench": bench, **results}, indent=2))
    (args.work_dir / "train_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
