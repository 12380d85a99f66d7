"""A plain gated-ABMIL training loop, the reference the default recipe is compared with.

What a researcher writes in 40 lines: batch size 1, 512 tiles sampled per bag and step, AdamW
at a constant learning rate, a fixed number of epochs, no validation split and no epoch
selection (every non-test patient trains). It runs on a cohort in the toolkit's layout
(``clinical.csv`` with ``patient_id`` and a binary label, ``slides.csv``, ``features/<slide>.h5``)
over the folds of a run's ``splits.yaml`` (or its own stratified 5 folds), and prints the pooled
out-of-fold AUROC and the wall time. Used to tell a hard cohort from an unlearnable one:
a recipe family that this loop cannot learn says nothing about the recipe.

    python benchmarks/reference_loop.py COHORT_DIR --splits runs/x/splits.yaml --hidden 128
    python benchmarks/reference_loop.py COHORT_DIR --lr 5e-4 --epochs 20
    python benchmarks/reference_loop.py COHORT_DIR --splits runs/x/splits.yaml --train-only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch import nn


class GatedABMIL(nn.Module):
    """Ilse et al. 2018, eq. 9: one hidden layer, gated attention, a linear head."""

    def __init__(self, in_dim: int, hidden: int, attn: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.v, self.u, self.w = nn.Linear(hidden, attn), nn.Linear(hidden, attn), nn.Linear(attn, 1)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, D] -> logits [2]
        h = self.embed(x)
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))), dim=0)  # [N, 1]
        return self.head((a * h).sum(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--splits", type=Path, default=None, help="a run's splits.yaml (default: 5 stratified folds)")
    parser.add_argument("--target", default="MSI")
    parser.add_argument("--positive", default="MSI-H")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-only", action="store_true",
                        help="train on each fold's train split only, leaving out its validation patients "
                             "(what the recipe trains on)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    clinical = pd.read_csv(args.cohort / "clinical.csv", dtype=str)
    slides = pd.read_csv(args.cohort / "slides.csv", dtype=str)
    bags = {}
    for pid, group in slides.groupby("patient_id"):
        parts = []
        for sid in group.slide_id:
            with h5py.File(args.cohort / "features" / f"{sid}.h5", "r") as f:
                parts.append(f["features"][:])
        bags[pid] = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    label = dict(zip(clinical.patient_id, (clinical[args.target] == args.positive).astype(int), strict=True))
    if args.splits:
        folds = yaml.safe_load(args.splits.read_text())
    else:
        ids = np.array(sorted(bags))
        y = np.array([label[i] for i in ids])
        folds = [{"train": list(ids[a]), "test": list(ids[b])}
                 for a, b in StratifiedKFold(5, shuffle=True, random_state=args.seed).split(ids, y)]
    start, probs, truth = time.perf_counter(), [], []
    for fold in folds:
        train = list(fold["train"])
        if not args.train_only:  # no selection: every non-test patient trains
            train += list(fold.get("val", []))
        model = GatedABMIL(next(iter(bags.values())).shape[1], args.hidden)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
        for _ in range(args.epochs):
            model.train()
            for pid in rng.permutation(train):
                x = bags[pid]
                if len(x) > 512:
                    x = x[torch.from_numpy(rng.choice(len(x), 512, replace=False))]
                loss = nn.functional.cross_entropy(model(x)[None], torch.tensor([label[pid]]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            for pid in fold["test"]:
                probs.append(torch.softmax(model(bags[pid]), 0)[1].item())
                truth.append(label[pid])
    print(f"pooled AUROC {roc_auc_score(truth, probs):.3f} in {time.perf_counter() - start:.0f} s "
          f"(lr {args.lr}, {args.epochs} epochs, hidden {args.hidden}, {len(folds)} folds"
          f"{', train split only' if args.train_only else ''})")


if __name__ == "__main__":
    main()
