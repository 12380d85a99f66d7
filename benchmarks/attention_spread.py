"""How far attention spreads over a bag while it trains, and what that does to the AUROC.

Attention MIL can put its weight on a few tiles (right when 2-5% of the tiles are witnesses)
or spread it (right when a weak signal is carried by half of them, where the bag mean is the
better statistic). This script trains a registry model in a plain loop (batch 1, 512 tiles
sampled per bag and step, AdamW at a constant learning rate with each module's ``lr_scale``
as the trainer applies it, no validation split) over 5 stratified folds, and prints after
every epoch the pooled out-of-fold AUROC and the attention's spread: the effective number of
tiles attended, ``exp(entropy)`` of the weights, as a fraction of the bag (1.0 = uniform, as
mean pooling), averaged over the test bags.

Cohorts: the families of ``benchmarks/recipe.py`` and two more dense-signal cohorts defined
here (``dense_sites_120``, ``dense_wide_60``), on which the attention's learning rate was chosen.

    python benchmarks/attention_spread.py dense_sites_120 --work-dir W --model gated_abmil
    python benchmarks/attention_spread.py dense_sites_120 --work-dir W --model-args '{"attn_lr_scale": 1.0}'
    python benchmarks/attention_spread.py near_normal_120 --work-dir W --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
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

from mil.models import create_model
from mil.synthetic import make_synthetic_cohort

# Dense-signal cohorts beside recipe.py's dense_100 (which was held out of the choice).
EXTRA = {
    "dense_sites_120": dict(n_patients=120, dim=128, family="dense", tiles_per_slide=(100, 300), strength=0.7,
                            tissue_states=8, nuisance=0.2, n_sites=2, site_shift=3.0),
    "dense_wide_60": dict(n_patients=60, dim=384, family="dense", tiles_per_slide=(200, 600), strength=0.6,
                          tissue_states=8, nuisance=0.2),
}


def cohort_dir(name: str, work: Path) -> Path:
    if name in FAMILIES:
        return make_cohort(name, work)
    out = work / "cohorts" / name
    if not (out / "slides.csv").is_file():  # written last
        make_synthetic_cohort(out, seed=sum(map(ord, name)), **EXTRA[name])
    return out


def spread(attention: torch.Tensor) -> float:
    """exp(entropy) / n for one bag's weights [n] (or [C, n], averaged over rows)."""
    w = attention.reshape(-1, attention.shape[-1]).clamp_min(1e-12)
    return float((torch.exp(-(w * w.log()).sum(-1)) / w.shape[-1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", choices=sorted([*FAMILIES, *EXTRA]))
    parser.add_argument("--work-dir", type=Path, required=True, help="cohorts are made under WORK_DIR/cohorts")
    parser.add_argument("--model", default="gated_abmil")
    parser.add_argument("--model-args", default="{}", help="JSON of constructor options, e.g. '{\"attn_lr_scale\": 1.0}'")
    parser.add_argument("--lr", type=float, default=5e-4, help="the toolkit's train.lr")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="training seed (the folds stay the same)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    arrays, label, _ = patient_bags(cohort_dir(args.cohort, args.work_dir))
    bags = {pid: torch.from_numpy(x) for pid, x in arrays.items()}
    ids = np.array(sorted(bags))
    y = np.array([label[i] for i in ids])
    scores = np.zeros((args.epochs, len(ids)))
    spreads = np.full((args.epochs, len(ids)), np.nan)
    start = time.perf_counter()
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(ids, y):
        model = create_model(args.model, in_dim=bags[ids[0]].shape[1], n_outputs=2, **json.loads(args.model_args))
        opt = plain_optimizer(model, args.lr)
        for epoch in range(args.epochs):
            model.train()
            for pid in rng.permutation(ids[train]):
                x = sample_tiles(bags[pid], rng)
                loss = F.cross_entropy(model(x[None]).logits, torch.tensor([label[pid]]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                for i in test:
                    out = model(bags[ids[i]][None])
                    scores[epoch, i] = torch.softmax(out.logits[0], 0)[1].item()
                    if out.attention is not None:
                        spreads[epoch, i] = spread(out.attention[0])
    auroc = [round(roc_auc_score(y, s), 3) for s in scores]
    print(json.dumps({
        "cohort": args.cohort, "model": args.model, "model_args": json.loads(args.model_args), "lr": args.lr,
        "seed": args.seed, "auroc_last5": round(float(np.mean(auroc[-5:])), 3), "auroc_by_epoch": auroc,
        "spread_by_epoch": [None if np.isnan(s).all() else round(float(np.nanmean(s)), 2) for s in spreads],
        "seconds": round(time.perf_counter() - start),
    }))


if __name__ == "__main__":
    main()
