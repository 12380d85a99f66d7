"""Per-epoch cost of every registered aggregator on one fixed synthetic cohort (CPU or GPU).

    python benchmarks/model_speed.py --out /tmp/model-speed            # every model
    python benchmarks/model_speed.py --out /tmp/model-speed --models transmil abmil --threads 2

Writes one cohort (default: 120 patients, 1-3 slides of 300-700 tiles, 64-d features, about
150k tiles) with :func:`mil.synthetic.make_synthetic_cohort`, loads every bag into memory once,
then for each model times

- a training epoch: every training bag once (80% of the patients), ``--bag-size`` sampled
  tiles, batch 1, forward + backward + AdamW step, the model's auxiliary loss included;
- an evaluation pass: the other 20% of the patients, full bags, no gradient.

Reading bags is left out (it is the same for every model; ``benchmarks/train_speed.py``
measures it), so the numbers are the models' own cost. Both wall-clock and process CPU
seconds are reported: on a shared machine the CPU seconds (with ``--threads 1``, what the run
would take alone on one core) are the comparable number. Prints a markdown table and writes
``model_speed.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mil.bags import read_features
from mil.losses import AUX_LOSSES
from mil.models import MODELS, create_model
from mil.synthetic import make_synthetic_cohort


def load_bags(out: Path, args: argparse.Namespace) -> tuple[list[torch.Tensor], torch.Tensor]:
    cohort = make_synthetic_cohort(
        out / "cohort", args.patients, tiles_per_slide=(300, 700), dim=args.dim, seed=args.seed, dtype="float32"
    )
    clinical = pd.read_csv(cohort.clinical_csv)
    slides = pd.read_csv(cohort.slide_csv).groupby("patient_id")["slide_id"].apply(list)
    bags = [
        torch.from_numpy(np.concatenate([read_features(cohort.features_dir / f"{s}.h5") for s in slides[p]]))
        for p in clinical["patient_id"]
    ]
    return bags, torch.tensor((clinical["MSI"] == "MSI-H").to_numpy(), dtype=torch.long)


def time_model(name: str, train: list[torch.Tensor], y: torch.Tensor, test: list[torch.Tensor], bag_size: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, train[0].shape[1], 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    aux = AUX_LOSSES.get(model.aux_loss) if getattr(model, "aux_loss", None) else None
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in torch.randperm(len(train)).tolist():
        x = train[i][torch.randperm(len(train[i]))[:bag_size]][None]
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        out = model(x, mask)
        loss = F.cross_entropy(out.logits, y[i : i + 1])
        if aux is not None:
            loss = loss + model.aux_loss_weight * aux(out, y[i : i + 1], mask, **model.aux_loss_kwargs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    t1, c1 = time.perf_counter(), time.process_time()
    model.eval()
    with torch.no_grad():
        for x in test:
            model(x[None])
    t2, c2 = time.perf_counter(), time.process_time()
    return {"model": name, "train_epoch_s": t1 - t0, "eval_s": t2 - t1, "train_epoch_cpu_s": c1 - c0,
            "eval_cpu_s": c2 - c1, "params": sum(p.numel() for p in model.parameters())}


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['train_epoch_cpu_s']:.1f} | {r['eval_cpu_s']:.1f} | {r['train_epoch_s']:.1f} | "
            f"{r['eval_s']:.1f} | {r['params']:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/model-speed"))
    parser.add_argument("--models", nargs="+", default=MODELS.names())
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bag-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    bags, labels = load_bags(args.out, args)
    n_train = round(0.8 * len(bags))
    tiles = sum(len(b) for b in bags)
    rows = []
    for name in args.models:
        r = time_model(name, bags[:n_train], labels[:n_train], bags[n_train:], args.bag_size)
        rows.append(r)
        print(_row(r), flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    print(f"\n{len(bags)} patients, {tiles:,} tiles, {args.dim}-d; train {n_train} bags x {args.bag_size} sampled "
          f"tiles, evaluate {len(bags) - n_train} full bags; {machine}\n")
    print("| model | train epoch, CPU s | evaluation, CPU s | train epoch, wall s | evaluation, wall s | parameters |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_speed.json").write_text(json.dumps({"machine": machine, "tiles": tiles, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
