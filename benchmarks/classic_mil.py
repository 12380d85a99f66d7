"""Classic MIL benchmarks (Musk1, Musk2, Fox, Tiger, Elephant) against Ilse et al. 2018, Table 1.

Each dataset is imported from ``../shared/data/mil-benchmarks`` with :func:`mil.importing.import_bags`
and cross-validated with the ordinary ``mil crossval`` (one subprocess per dataset and model,
one thread each) using ``configs/benchmarks/classic_base.yaml`` + ``configs/benchmarks/<dataset>.yaml``:
5 repeats of 10-fold CV, standardisation fitted on training folds, the epoch chosen on the
inner validation split. Accuracy (argmax of the two class probabilities, i.e. threshold 0.5)
and AUROC are computed per test fold from each fold's ``predictions.csv``; the table reports
mean ± std over the folds.

    python benchmarks/classic_mil.py                      # full table (5 x 10-fold, both models)
    python benchmarks/classic_mil.py --repeats 1 --jobs 2 # quicker: one 10-fold CV
    python benchmarks/classic_mil.py --datasets musk1 -- train.lr=1e-3   # extra config overrides

Finished folds are kept, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mil-benchmarks"
DATASETS = {"musk1": "Musk1/musk1.mat", "musk2": "Musk2/musk2.mat", "fox": "Fox/fox.mat",
            "tiger": "Tiger/tiger.mat", "elephant": "Elephant/elephant.mat"}
MODELS = {"abmil": "Attention", "gated_abmil": "Gated-Attention"}
# Ilse, Tomczak & Welling 2018, Table 1 (accuracy, mean ± std), as commonly cited.
PAPER = {
    "abmil": {"musk1": (0.892, 0.040), "musk2": (0.858, 0.048), "fox": (0.615, 0.043),
              "tiger": (0.839, 0.022), "elephant": (0.868, 0.022)},
    "gated_abmil": {"musk1": (0.900, 0.050), "musk2": (0.863, 0.042), "fox": (0.603, 0.029),
                    "tiger": (0.845, 0.018), "elephant": (0.857, 0.027)},
}


def import_dataset(name: str, data_dir: Path, work: Path) -> Path:
    from mil.importing import import_bags

    out = work / "data" / name
    if not (out / "slides.csv").is_file():  # written last: an interrupted import is redone
        import_bags(data_dir / DATASETS[name], out)
    return out


def crossval(name: str, model: str, data: Path, work: Path, repeats: int, extra: list[str]) -> tuple[Path, float] | None:
    """Run ``mil crossval`` in a subprocess with one thread; returns the run folder and seconds."""
    out = work / f"{name}-{model}"
    cmd = [
        sys.executable, "-m", "mil", "crossval",
        str(ROOT / "configs/benchmarks/classic_base.yaml"), str(ROOT / f"configs/benchmarks/{name}.yaml"),
        f"model.name={model}", f"cv.repeats={repeats}",
        f"cohort.clinical_csv={data / 'clinical.csv'}", f"cohort.slide_csv={data / 'slides.csv'}",
        f"cohort.features_dir={data / 'features'}", f"output_dir={out}", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    log = work / f"{name}-{model}.log"
    for attempt in range(2):  # a rerun resumes from the last finished fold
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc == 0:
            break
        print(f"{name} {model}: attempt {attempt + 1} failed ({rc}); see {log}", file=sys.stderr, flush=True)
    else:
        return None
    seconds = time.perf_counter() - t0
    print(f"{name} {model}: done in {seconds / 60:.1f} min -> {out}", flush=True)
    return out, seconds


def fold_scores(run: Path) -> pd.DataFrame:
    """Accuracy (argmax) and AUROC of every test fold of a finished run."""
    pred = pd.read_csv(run / "predictions.csv", dtype={"label": str})
    rows = []
    for fold, df in pred.groupby("fold", sort=True):
        y = (df["label"] == "positive").to_numpy()
        p = df["prob_positive"].to_numpy()
        acc = float(((p > df["prob_negative"].to_numpy()) == y).mean())
        auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else np.nan
        repeat = int(df["repeat"].iloc[0]) if "repeat" in df else 0
        rows.append({"fold": fold, "repeat": repeat, "accuracy": acc, "auroc": auc, "n": len(df)})
    return pd.DataFrame(rows)


def table(results: dict[tuple[str, str], pd.DataFrame], seconds: dict[tuple[str, str], float], repeats: int) -> str:
    lines = [
        "| dataset | model | accuracy (ours), ± std over folds | std of repeat means | accuracy (Ilse et al.) "
        "| within 1 std | AUROC (ours) | folds | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, model), df in results.items():
        acc, auc = df["accuracy"], df["auroc"].dropna()
        per_repeat = df.groupby("repeat")["accuracy"].mean()
        rep_std = f"{per_repeat.std(ddof=1):.3f}" if len(per_repeat) > 1 else "–"
        ref, ref_std = PAPER[model][name]
        verdict = "beats" if acc.mean() > ref else ("yes" if ref - acc.mean() <= ref_std else "**no**")
        minutes = f"{seconds[name, model] / 60:.1f}" if (name, model) in seconds else "resumed"
        lines.append(
            f"| {name} | {MODELS[model]} (`{model}`) | {acc.mean():.3f} ± {acc.std(ddof=1):.3f} | {rep_std} "
            f"| {ref:.3f} ± {ref_std:.3f} | {verdict} | {auc.mean():.3f} ± {auc.std(ddof=1):.3f} | {len(df)} | {minutes} |"
        )
    note = (f"\n{repeats} repeat(s) of 10-fold CV; mean ± sample std (ddof=1) over the test folds, and the std of the "
            "per-repeat mean accuracies; accuracy = argmax of the two class probabilities (threshold 0.5). "
            "'within 1 std': ours ≥ paper mean − paper std; 'beats': ours > paper mean.\n")
    return "\n".join(lines) + note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA, help="folder holding Musk1/, Musk2/, Fox/, Tiger/, Elephant/")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/benchmarks/classic", help="imported data and runs")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5, help="repeats of 10-fold CV (the literature uses 5)")
    parser.add_argument("--jobs", type=int, default=1, help="cross-validations run in parallel (one thread each)")
    parser.add_argument("--output", type=Path, help="markdown table (default: <work-dir>/classic_mil.md)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, e.g. train.lr=1e-3")
    args = parser.parse_args()

    if not args.data_dir.is_dir():
        print(f"skipping the classic MIL benchmark: {args.data_dir} is absent", file=sys.stderr)
        return 0
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = {name: import_dataset(name, args.data_dir, work) for name in args.datasets}
    jobs = [(name, model) for name in args.datasets for model in args.models]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(crossval, *job, data[job[0]], work, args.repeats, args.overrides) for job in jobs}
        runs = {job: f.result() for job, f in futures.items()}
    failed = [job for job, run in runs.items() if run is None]
    runs = {job: run for job, run in runs.items() if run is not None}
    results = {job: fold_scores(run) for job, (run, _) in runs.items()}
    text = table(results, {job: s for job, (_, s) in runs.items()}, args.repeats)
    out = args.output or work / "classic_mil.md"
    out.write_text(text)
    print(text)
    if failed:
        print(f"failed (rerun the same command to resume): {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
