"""Which of DSMIL's two streams carries the signal, and does its critical instance find the witnesses?

DSMIL (Li, Li & Eliceiri, CVPR 2021) predicts from a bag stream whose attention is centred on
a *critical instance*, the tile its instance classifier scores highest; the max-instance loss
trains that classifier on one tile per bag. This script trains ``mil``'s DSMIL in a plain loop
(batch 1, 512 tiles sampled per bag and step, AdamW at a constant learning rate, bag
cross-entropy + ``--aux-weight`` x the max-instance loss, no validation split) over 5
stratified folds of a ``benchmarks/recipe.py`` cohort family, and prints the pooled
out-of-fold AUROC of

- ``bag``: the bag stream (what ``mil`` predicts with);
- ``max``: the max-instance stream (the instance classifier's top tile);
- ``avg``: their mean probability (the reference code's ``--average``);

and ``critical_witness``: the share of test positives whose critical instance is a planted
witness tile (the cohort is drawn again in a temporary folder to know which tiles those are).
Other registry models run too (``--model``; only ``bag`` is reported for them).

    python benchmarks/dsmil_streams.py near_normal_120 --work-dir W
    python benchmarks/dsmil_streams.py near_normal_120 --work-dir W --aux-weight 1 --epochs 40
    python benchmarks/dsmil_streams.py near_normal_120 --work-dir W --model-args '{"embed_dims": []}'
    python benchmarks/dsmil_streams.py near_normal_120 --work-dir W --outputs 1   # one output + BCE, as Li et al. for binary tasks
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import FAMILIES, make_cohort, patient_bags, plain_optimizer, sample_tiles

from mil.losses import dsmil_max_instance_loss
from mil.models import create_model
from mil.synthetic import make_synthetic_cohort


def witness_masks(family: str, tiles: dict[str, list[tuple[str, int]]]) -> dict[str, np.ndarray]:
    """Per patient, a boolean [n_tiles] of its planted tiles; ``tiles``: patient -> [(slide id, n tiles)] in bag order."""
    tmp = tempfile.mkdtemp()
    try:
        planted = make_synthetic_cohort(tmp, seed=sum(map(ord, family)), **FAMILIES[family][0]).positive_tiles
    finally:
        shutil.rmtree(tmp)
    return {pid: np.concatenate([np.isin(np.arange(n), planted.get(sid, [])) for sid, n in slides])
            for pid, slides in tiles.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--work-dir", type=Path, required=True, help="cohorts are made under WORK_DIR/cohorts")
    parser.add_argument("--model", default="dsmil")
    parser.add_argument("--model-args", default="{}", help="JSON of constructor options")
    parser.add_argument("--outputs", type=int, default=2, choices=(1, 2),
                        help="2: softmax over two classes (mil's binary tasks); 1: one logit with BCE")
    parser.add_argument("--aux-weight", type=float, default=0.25, help="weight of the max-instance loss")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    arrays, label, tiles = patient_bags(make_cohort(args.family, args.work_dir))
    bags = {pid: torch.from_numpy(x) for pid, x in arrays.items()}
    witnesses = witness_masks(args.family, tiles)
    ids = np.array(sorted(bags))
    y = np.array([label[i] for i in ids])
    C = args.outputs
    scores: dict[str, list[float]] = {"bag": [], "max": [], "avg": []}
    truth, hits = [], []

    def probability(logits: torch.Tensor) -> float:  # [C] -> P(positive)
        return torch.softmax(logits, 0)[1].item() if C == 2 else torch.sigmoid(logits[0]).item()

    start = time.perf_counter()
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(ids, y):
        model = create_model(args.model, in_dim=bags[ids[0]].shape[1], n_outputs=C, **json.loads(args.model_args))
        opt = plain_optimizer(model, args.lr)
        for _ in range(args.epochs):
            model.train()
            for pid in rng.permutation(ids[train]):
                x = sample_tiles(bags[pid], rng)
                out, target = model(x[None]), torch.tensor([label[pid]])
                loss = (F.cross_entropy(out.logits, target) if C == 2
                        else F.binary_cross_entropy_with_logits(out.logits[:, 0], target.float()))
                if args.aux_weight:
                    loss = loss + args.aux_weight * dsmil_max_instance_loss(out, target, torch.ones(1, len(x), dtype=torch.bool))
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            for pid in ids[test]:
                out = model(bags[pid][None])
                bag = probability(out.logits[0])
                top = probability(out.aux["instance_logits"][0].amax(0)) if out.aux else float("nan")
                if label[pid] and out.aux:
                    hits.append(bool(witnesses[pid][out.aux["critical_index"][0, C - 1].item()]))
                scores["bag"].append(bag)
                scores["max"].append(top)
                scores["avg"].append((bag + top) / 2)
                truth.append(label[pid])
    auroc = {k: round(roc_auc_score(truth, v), 3) for k, v in scores.items() if not np.isnan(v).any()}
    print(json.dumps({
        "family": args.family, "model": args.model, "model_args": json.loads(args.model_args), "outputs": C,
        "aux_weight": args.aux_weight, "lr": args.lr, "epochs": args.epochs, **auroc,
        "critical_witness": round(float(np.mean(hits)), 2) if hits else None,
        "seconds": round(time.perf_counter() - start),
    }))


if __name__ == "__main__":
    main()
