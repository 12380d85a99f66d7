"""One table per cohort family: every model's pooled AUROC, wall time and kept epochs from recipe runs.

Reads the ``results.json`` of ``benchmarks/recipe.py`` work dirs (one per model, run with
``--model``) and each run's saved ``config.yaml`` for the model's name. Attention models are
compared with the best attention model of the family; the pooling baselines are reported but
not compared (issue "Every aggregator learns"). A family is *learnable* when its best model
reaches ``--learnable`` AUROC.

    for m in abmil gated_abmil clam_sb clam_mb dsmil transmil mean_pool max_pool; do
      python benchmarks/recipe.py --recipes default --work-dir W/reg-$m --model $m -- cv.jobs=1
    done
    python benchmarks/registry_table.py W/reg-*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import FAMILIES, run_dir

BASELINES = {"mean_pool", "max_pool"}


def load_rows(work_dirs: list[Path], recipe: str) -> list[dict[str, Any]]:
    """The ``recipe`` rows of every work dir, each with ``model`` from its run's config.yaml."""
    rows = []
    for work in work_dirs:
        path = work / "results.json"
        if not path.is_file():
            continue
        for row in json.loads(path.read_text()):
            if row["recipe"] != recipe:
                continue
            config = run_dir(work, row["family"], recipe) / "config.yaml"
            model = yaml.safe_load(config.read_text())["model"]["name"] if config.is_file() else work.name
            rows.append({**row, "model": model, "work_dir": str(work)})
    return rows


def family_table(family: str, rows: list[dict[str, Any]], learnable: float) -> str:
    attention = [r for r in rows if r["model"] not in BASELINES]
    best = max((r["auroc"] for r in attention), default=float("nan"))
    lines = [f"#### `{family}`: {FAMILIES[family][2]}" if family in FAMILIES else f"#### `{family}`", "",
             "| model | AUROC | − best attention model | wall s | kept epochs (min over folds and inner models) | warnings |",
             "|---|---|---|---|---|---|"]
    models = [r["model"] for r in rows]
    for r in sorted(rows, key=lambda r: (r["model"] in BASELINES, -r["auroc"])):
        epochs = [e for fold in r["kept_epochs"] for e in (fold if isinstance(fold, list) else [fold])]
        gap = "baseline" if r["model"] in BASELINES else f"{r['auroc'] - best:+.3f}"
        name = f"`{r['model']}`" + (f" ({Path(r['work_dir']).name})" if models.count(r["model"]) > 1 else "")
        lines.append(f"| {name} | {r['auroc']:.3f} | {gap} | {r['seconds']:.0f} | {min(epochs)} | {r['warnings']} |")
    verdict = "learnable" if best >= learnable else f"not learnable by any model here (best {best:.3f} < {learnable})"
    return "\n".join([*lines, "", f"Best attention model {best:.3f}: {verdict}."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dirs", nargs="+", type=Path)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--learnable", type=float, default=0.7, help="best AUROC from which a family counts as learnable")
    args = parser.parse_args()
    rows = load_rows(args.work_dirs, args.recipe)
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    print("\n\n".join(family_table(f, [r for r in rows if r["family"] == f], args.learnable) for f in families))


if __name__ == "__main__":
    main()
