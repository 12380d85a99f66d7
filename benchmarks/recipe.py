"""The training-recipe benchmark: does the default recipe learn on cohorts that hide the signal differently?

Each cohort family (:mod:`mil.synthetic`) hides a planted signal another way: a small witness
cluster, a state close to normal tissue, decoys in both classes, site shifts, one slide of
several, class imbalance, an absent morphology, a weak dense signal; at 30 to 1,000
patients and 64 to 2,560 dimensions. Every cohort is cross-validated (patient-level folds,
the inner validation split selects; the test folds choose nothing) with:

- ``default``: the toolkit's defaults (``mil crossval`` with no train.* override);
- ``old``: the defaults before the recipe work (batch 8, cosine decay, 40 epochs, early
  stopping on the validation loss with patience 10, that loss's minimum selects; the per-bag
  class weighting fix applies to every recipe, so the old loss defect is not reproduced);
- ``grid:*``: a small grid around the default; the best grid point per cohort **chosen on
  the test folds** is the upper bound, an optimistic reference and labelled as such.

    python benchmarks/recipe.py                         # every family, default + old + grid
    python benchmarks/recipe.py --families witness_30 --recipes default old
    python benchmarks/recipe.py --model abmil -- model.args={hidden_dim: 128}   # extra overrides

Writes ``<work-dir>/results.json`` (one row per cohort and recipe, kept as it goes, so a rerun
resumes) and prints a markdown table. One torch thread per process; the folds of a run train in
parallel processes as `cv.jobs=auto` decides (two on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name -> (mil.synthetic.make_synthetic_cohort arguments, folds, what makes it hard)
FAMILIES: dict[str, tuple[dict[str, Any], int, str]] = {
    "witness_30": (dict(n_patients=30, dim=64, family="witness", slides_per_patient=(1, 2), tiles_per_slide=(40, 120),
                        signal_fraction=0.10, strength=5.0, tissue_states=8), 5,
                   "30 patients, 10% witness tiles in a cluster"),
    "decoy_sites_40": (dict(n_patients=40, dim=64, family="decoy", tiles_per_slide=(60, 200), signal_fraction=0.05,
                            strength=6.0, tissue_states=8, n_sites=4, site_shift=4.0), 5,
                       "5% witnesses, salient decoys in both classes, 4 sites"),
    "near_normal_120": (dict(n_patients=120, dim=384, family="near_normal", tiles_per_slide=(300, 1000),
                             signal_fraction=0.02, strength=3.0, tissue_states=8), 5,
                        "2% witness tiles 3 sd from a normal tissue state"),
    "one_slide_80": (dict(n_patients=80, dim=384, family="one_slide", tiles_per_slide=(100, 300), signal_fraction=0.05,
                          strength=3.0, tissue_states=8), 5,
                     "signal in one of 2-4 slides"),
    "imbalanced_200": (dict(n_patients=200, dim=128, family="witness", tiles_per_slide=(100, 300),
                            positive_fraction=0.15, signal_fraction=0.03, strength=5.0, tissue_states=8, n_sites=3), 5,
                       "15% prevalence, 3% witnesses, 3 sites"),
    "absence_60": (dict(n_patients=60, dim=256, family="absence", tiles_per_slide=(100, 300), signal_fraction=0.05,
                        strength=5.0, tissue_states=8), 5,
                   "negatives have 5% marker tiles that positives lack"),
    "dense_100": (dict(n_patients=100, dim=64, family="dense", tiles_per_slide=(50, 150), strength=1.0,
                       tissue_states=8, nuisance=0.2), 5,
                  "half of the tiles weakly shifted"),
    "wide_2560_40": (dict(n_patients=40, dim=2560, family="witness", slides_per_patient=(1, 2),
                          tiles_per_slide=(100, 300), signal_fraction=0.05, strength=4.0, tissue_states=8), 5,
                     "2,560-d (Virchow2 width), 5% witnesses"),
    "large_1000": (dict(n_patients=1000, dim=64, family="witness", slides_per_patient=(1, 2), tiles_per_slide=(30, 100),
                        signal_fraction=0.05, strength=2.5, tissue_states=8, n_sites=5), 3,
                   "1,000 patients, 5% witnesses, 5 sites"),
}

OLD_DEFAULTS = ["train.lr=2e-4", "train.batch_size=8", "train.scheduler=cosine", "train.warmup_steps=0", "train.min_steps=0",
                "train.monitor=val_loss", "train.monitor_window=1", "train.selection=best", "train.patience=10",
                "train.max_epochs=40", "train.refit=false", "cv.inner_folds=0"]
RECIPES: dict[str, list[str]] = {
    "default": [],
    "old": OLD_DEFAULTS,
    "grid:lr=1e-4": ["train.lr=1e-4"],
    "grid:lr=5e-4": ["train.lr=5e-4"],
    "grid:lr=1e-3": ["train.lr=1e-3"],
    "grid:last": ["train.selection=last"],
    "grid:steps=2000": ["train.min_steps=2000", "train.max_epochs=30"],  # the budget before 2026-11-30
    "grid:hidden=128": ["model.args.hidden_dim=128"],  # ABMIL-family widths only
    "grid:refit": ["cv.inner_folds=0", "train.refit=true"],  # one validation split, then a refit (the default until 2026-12-01)
    "grid:no_refit": ["cv.inner_folds=0", "train.refit=false"],  # the model selected on one validation split
    "grid:cosine": ["train.scheduler=cosine"],  # decays to 0 over the budget
    "grid:inner_folds=2": ["cv.inner_folds=2", "train.refit=true"],  # epoch chosen on 2 inner folds, then one refit
    "grid:ensemble=5": ["cv.inner_folds=5"],  # 5 inner models averaged (the default averages 3)
    "grid:ensemble=3,last": ["train.selection=last"],  # the default's inner models keep the budget's last epoch
}


def make_cohort(name: str, work: Path, seed_offset: int = 0) -> Path:
    """The family's cohort under ``work/cohorts`` (made once); ``seed_offset`` > 0 draws another cohort of it."""
    from mil.synthetic import make_synthetic_cohort

    out = work / "cohorts" / (name if not seed_offset else f"{name}_seed{seed_offset}")
    if not (out / "slides.csv").is_file():  # written last
        make_synthetic_cohort(out, seed=sum(map(ord, name)) + seed_offset, **FAMILIES[name][0])
    return out


def patient_bags(cohort: Path) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, list[tuple[str, int]]]]:
    """A family cohort read whole, for the plain training loops of ``benchmarks/``.

    Returns per patient its bag (the tiles of its slides concatenated, [n_tiles, D] float32), its
    label (1 for MSI-H) and ``[(slide id, n tiles), ...]`` in bag order.
    """
    import h5py
    import pandas as pd

    clinical = pd.read_csv(cohort / "clinical.csv", dtype=str)
    slides = pd.read_csv(cohort / "slides.csv", dtype=str)
    bags, tiles = {}, {}
    for pid, group in slides.groupby("patient_id"):
        parts = []
        for sid in group.slide_id:
            with h5py.File(cohort / "features" / f"{sid}.h5", "r") as f:
                parts.append(f["features"][:])
        bags[pid] = np.concatenate(parts).astype(np.float32)
        tiles[pid] = [(sid, len(x)) for sid, x in zip(group.slide_id, parts, strict=True)]
    labels = dict(zip(clinical.patient_id, (clinical.MSI == "MSI-H").astype(int), strict=True))
    return bags, labels, tiles


def plain_optimizer(model: Any, lr: float) -> Any:
    """AdamW (weight decay 1e-2) with the trainer's parameter groups (each module's ``lr_scale``), for the plain loops."""
    import torch

    from mil.models.base import parameter_groups

    return torch.optim.AdamW(parameter_groups(model, lr=lr), lr=lr, weight_decay=1e-2)


def sample_tiles(bag: Any, rng: np.random.Generator, n: int = 512) -> Any:
    """``n`` tiles of a bag tensor [N, D] drawn without replacement (all of them when N <= n), as in training."""
    import torch

    return bag[torch.from_numpy(rng.choice(len(bag), n, replace=False))] if len(bag) > n else bag


def run_dir(work: Path, name: str, recipe: str) -> Path:
    """Where the cross-validation of one family under one recipe writes (``config.yaml``, folds, metrics)."""
    return work / "runs" / name / recipe.replace(":", "_").replace("=", "")


def run(name: str, recipe: str, cohort: Path, work: Path, extra: list[str]) -> dict[str, Any]:
    from mil.config import load_config
    from mil.crossval import run_crossval

    out = run_dir(work, name, recipe)
    overrides = [
        f"cohort.clinical_csv={cohort / 'clinical.csv'}", f"cohort.slide_csv={cohort / 'slides.csv'}",
        f"cohort.features_dir={cohort / 'features'}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]",
        f"cv.folds={FAMILIES[name][1]}", "cv.bootstrap=200", "trainer.accelerator=cpu", "trainer.logger=none",
        "trainer.enable_progress_bar=false", f"output_dir={out}", *RECIPES[recipe], *extra,
    ]
    start = time.perf_counter()
    run_crossval(load_config(overrides))
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("fold_*/summary.json"))]
    return {
        "family": name, "recipe": recipe, "auroc": metrics["pooled"]["auroc"]["value"], "seconds": round(seconds, 1),
        "kept_epochs": [s["best_epoch"] for s in summaries], "epochs_run": [s["epochs_run"] for s in summaries],
        "warnings": sum(len(s.get("warnings", [])) for s in summaries),
    }


def _cell(r: dict[str, Any] | None) -> str:
    return f"{r['auroc']:.3f} ({r['seconds']:.0f})" if r else "—"


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["family"], r["recipe"]): r for r in rows}
    lines = ["| family | what is hard | default AUROC (s) | old defaults AUROC (s) | upper bound (grid, chosen on test) | default - bound | kept epochs (default) |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["family"] for r in rows):
        d, o = by.get((name, "default")), by.get((name, "old"))
        grid = [r for (n, rec), r in by.items() if n == name and (rec.startswith("grid:") or rec == "default")]
        bound = max(grid, key=lambda r: r["auroc"]) if grid else None
        gap = f"{d['auroc'] - bound['auroc']:+.3f}" if d and bound else "—"
        bound_cell = f"{bound['auroc']:.3f} ({bound['recipe']})" if bound else "—"
        epochs = ", ".join(map(str, d["kept_epochs"])) if d else "—"
        lines.append(f"| {name} | {FAMILIES[name][2]} | {_cell(d)} | {_cell(o)} | {bound_cell} | {gap} | {epochs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "benchmarks" / "recipe")
    parser.add_argument("--model", default=None, help="model.name for every run (default: the toolkit's)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="draw other cohorts of the same families (a check that a choice is not tuned to one draw)")
    parser.add_argument("extra", nargs="*", help="config overrides for every run (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    extra = list(args.extra) + ([f"model.name={args.model}"] if args.model else [])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.work_dir / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["family"], r["recipe"]) for r in rows}
    for name in args.families:
        cohort = make_cohort(name, args.work_dir, args.seed_offset)
        for recipe in args.recipes:
            if (name, recipe) in done:
                continue
            row = run(name, recipe, cohort, args.work_dir, extra)
            rows.append(row)
            print(json.dumps(row), flush=True)
            results_path.write_text(json.dumps(rows, indent=1))
    print(table([r for r in rows if r["family"] in args.families]))
    aurocs = [r["auroc"] for r in rows if r["recipe"] == "default" and r["family"] in args.families]
    if aurocs:
        print(f"default: mean AUROC {np.mean(aurocs):.3f}, min {min(aurocs):.3f} over {len(aurocs)} families")
    assert all(math.isfinite(a) for a in aurocs)


if __name__ == "__main__":
    main()
