"""`mil predict`: apply a trained run (one model or a cross-validation ensemble) to a new cohort.

The run folder carries everything prediction needs: the resolved training config, the task
(type, label columns, class order), the feature dimension and the encoder identity of the bags
it was trained on. The new cohort is described by ``cohort.*`` overrides (or a YAML);
everything else comes from the run. A fold ensemble averages each prediction column over the
folds' models (probabilities, regression predictions, centred risks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mil.bags import UNKNOWN, identity_value
from mil.cohort import Cohort, LabelColumn, load_cohort
from mil.config import ConfigError, load_config
from mil.covariates import model_covariates, read_covariates
from mil.crossval import id_columns, is_main_process, load_run_model, predictions_frame
from mil.fitting import model_files
from mil.inference import predict_outputs, resolve_device
from mil.io import atomic_path, write_text
from mil.report import write_report
from mil.slide_scores import write_slide_predictions
from mil.tables import list_examples
from mil.tasks import Task, task_class, task_from_meta

logger = logging.getLogger(__name__)


class RunMismatchError(ValueError):
    """The new cohort's bags do not fit the trained run; the message says what differs."""


@dataclass
class Run:
    """A finished `mil crossval` or `mil train` folder."""

    path: Path
    config: DictConfig
    meta: DictConfig
    weights: dict[str, Path]  # model name ("fold_0", ... or "model") -> safetensors file

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta.classes]

    @property
    def task(self) -> Task:
        return task_from_meta(self.meta, self.config)


# What a training run's run.yaml must hold for prediction.
_RUN_KEYS = ("kind", "in_dim", "encoder")


def load_run(run_dir: str | Path) -> Run:
    """A finished training run; raises naming the folder when it is not one (or is damaged)."""
    run_dir = Path(run_dir)
    try:
        meta = OmegaConf.load(run_dir / "run.yaml") if (run_dir / "run.yaml").is_file() else None
        if meta is not None and meta.get("kind") == "predict":
            raise ConfigError(f"{run_dir} holds predictions (of {meta.get('run')}), not a trained model; pass the training run")
        for name in ("config.yaml", "run.yaml"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(f"{run_dir} is not a finished run folder: {name} is missing")
        config = load_config(base=OmegaConf.load(run_dir / "config.yaml"))
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # YAML errors: a damaged run folder
        raise ConfigError(f"{run_dir} is a damaged run folder: {str(e).splitlines()[0]}") from None
    missing = [k for k in _RUN_KEYS if k not in meta]
    if missing or meta.kind not in ("train", "crossval"):
        raise ConfigError(
            f"{run_dir}/run.yaml is damaged or not from `mil crossval`/`mil train` (missing {', '.join(missing) or 'nothing'}, "
            f"kind {meta.get('kind')!r}); was the folder overwritten? Train the run again"
        )
    folders = ({"model": run_dir} if meta.kind == "train" else
               {str(f.name): run_dir / str(f.name) for f in OmegaConf.load(run_dir / "splits.yaml")})
    weights = {f"{name}.{member}" if member else name: path  # cv.inner_folds ensembles: each inner model
               for name, folder in folders.items() for member, path in model_files(folder).items()}
    missing = [str(p) for p in weights.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: model weights missing ({', '.join(missing[:3])}); is the run finished?")
    return Run(run_dir, config, meta, weights)


def check_compatible(run: Run, cohort: Cohort) -> None:
    """Refuse bags of another feature dimension, encoder, recipe, resolution or tile size than the
    run was trained on. What either side does not record (bags from other tools, older runs) cannot
    be checked: one warning names it."""
    if cohort.dim != run.meta.in_dim:
        raise RunMismatchError(
            f"feature dimension differs: the run {run.path} was trained on {run.meta.in_dim}-d features, "
            f"the bags in {cohort.bags[0].paths[0].parent} are {cohort.dim}-d"
        )
    trained = {k: identity_value(v) for k, v in run.meta.encoder.items()}
    unchecked, diff = [], {}
    for key, value in cohort.identity.items():
        before = trained.get(key, UNKNOWN)
        if UNKNOWN in (before, value):
            unchecked.append(key)
        elif before != value:
            diff[key] = (before, value)
    if diff:
        details = ", ".join(f"{k}: run {a!r} vs cohort {b!r}" for k, (a, b) in diff.items())
        raise RunMismatchError(
            f"bags were made by a different encoder, recipe, resolution or tile size than the run {run.path} ({details})"
        )
    if unchecked:
        logger.warning("cannot check that the bags match the run in %s (not recorded by the run or the bags)",
                       ", ".join(unchecked))


def prediction_config(run: Run, overrides: list[str]) -> DictConfig:
    """The run's config with the new cohort and output folder merged in; class order pinned."""
    cfg = load_config(overrides, base=run.config)
    if cfg.task.type != run.task.name:
        raise ConfigError(f"task.type={cfg.task.type!r}, but the run {run.path} was trained for {run.task.name!r}")
    if run.task.name == "classification":
        cfg.cohort.classes = run.classes
    check_output_dir(Path(cfg.output_dir), run)
    return cfg


def check_output_dir(out: Path, run: Run) -> None:
    """Refuse an output folder that is (or holds) a training run, or holds another run's predictions.

    Rerunning the same prediction into its own folder is allowed.
    """
    hint = "set output_dir=... to a new folder for the predictions"
    same = out.exists() and out.resolve() == run.path.resolve()
    if same or Path(str(out)).absolute() == Path(str(run.config.output_dir)).absolute():
        raise ConfigError(f"output_dir {out} is the training run's folder: predicting there would overwrite it; {hint}")
    if not out.is_dir():
        return
    if (out / "config.yaml").is_file() or any(out.glob("*/model.safetensors")) or (out / "model.safetensors").is_file():
        raise ConfigError(f"output_dir {out} holds a training run; {hint}")
    meta_path = out / "run.yaml"
    if meta_path.is_file():
        meta = OmegaConf.load(meta_path)
        if meta.get("kind") != "predict" or Path(str(meta.get("run"))).resolve() != run.path.resolve():
            raise ConfigError(f"output_dir {out} holds another run ({meta.get('kind')} of {meta.get('run')}); {hint}")


def patients_seen_in_training(run: Run, cohort: Cohort) -> list[str]:
    """The cohort's patients whose IDs the run trained or validated a model on (its ``splits.yaml``), sorted.

    A cross-validation's fold ensemble has seen every patient of its cohort: each trained the
    models of the folds it was not tested in. Metrics over such patients are not an external
    validation. IDs from another institution can coincide by chance, hence a warning, not an error.
    """
    splits = run.path / "splits.yaml"
    if not splits.is_file():
        return []
    seen = {str(p) for fold in OmegaConf.load(splits) for side in ("train", "val") for p in fold.get(side) or []}
    return sorted({b.patient_id for b in cohort.bags} & seen)


def prediction_columns(run: Run, cfg: DictConfig) -> list[LabelColumn]:
    """The label columns named by ``cfg`` (renaming allowed), with the run's class orders."""
    named = task_class(cfg).label_columns(cfg)
    return [replace(c, classes=trained.classes) for c, trained in zip(named, run.task.columns, strict=True)]


def run_predict(run_dir: str | Path, overrides: list[str]) -> Path:
    """Predict every bag of the configured cohort from its bags; write predictions (and metrics when labelled).

    To predict straight from slides (embedding them first), use :func:`mil.commands.predict.run_predict`,
    which is what `mil predict` calls.
    """
    run = load_run(run_dir)
    cfg = prediction_config(run, overrides)
    out = Path(cfg.output_dir)
    columns = prediction_columns(run, cfg)
    task = task_class(cfg)(columns, cfg)
    # labels outside the trained classes (e.g. MSI-L for an MSS/MSI-H model): predicted, left out of the metrics
    cohort = load_cohort(cfg.cohort, require_labels=False, columns=columns, unknown_labels="ignore")
    check_compatible(run, cohort)
    seen = patients_seen_in_training(run, cohort)
    n_patients = len({b.patient_id for b in cohort.bags})
    if seen:
        logger.warning(
            "%d of the cohort's %d patients (%s) have the IDs of patients the run %s trained or validated on "
            "(its splits.yaml): if they are the same patients, their predictions and the metrics are not an external "
            "validation. For the run's own patients, its cross-validated predictions.csv is the honest estimate; "
            "predict on patients it has not seen", len(seen), n_patients, list_examples(seen), run.path)
    raw_covariates = read_covariates(cfg.cohort, cohort.bags, context=f" (the run {run.path} was trained with them)")
    device = resolve_device(cfg.trainer.accelerator)
    per_model: dict[str, dict[str, np.ndarray]] = {}
    models, model_covs = {}, {}
    for name, path in run.weights.items():
        model = models[name] = load_run_model(run.path, path)
        covariates = model_covs[name] = model_covariates(model, raw_covariates, cohort.bags, f"{run.path} {name}")
        outputs = predict_outputs(model, cohort.bags, cfg.train.eval_batch_size, device, cfg.train.precision,
                                  covariates=covariates)
        per_model[name] = task.predictions(outputs)
        logger.info("%s: predicted %d bags", name, len(cohort.bags))
    ensemble = {c: np.mean([p[c] for p in per_model.values()], axis=0) for c in task.prediction_names}
    task.thresholds = run.task.thresholds
    threshold = (task.thresholds or {}).get("ensemble")  # the run's, chosen on its validation splits
    df = predictions_frame(cfg, task, cohort.bags, {**ensemble, **task.calls(ensemble, threshold)})
    if len(per_model) > 1:
        each = {f"{name}.{c}": values for name, p in per_model.items() for c, values in p.items()}
        df = pd.concat([df, pd.DataFrame(each, index=df.index)], axis=1)
    if not is_main_process():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "predictions.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_slide_predictions(cfg, task, cohort.bags, list(models.values()), out / "slide_predictions.csv",
                            covariates=[model_covs[name] for name in models])
    meta = {"kind": "predict", "run": str(run.path), **task.metadata(), "models": list(run.weights),
            **({"thresholds": task.thresholds} if task.thresholds else {}),
            "bootstrap": {"n": cfg.cv.bootstrap, "seed": cfg.cv.seed}}
    if seen:
        meta["patients_seen_in_training"] = len(seen)
    if cohort.unknown_labels:  # counted, so the metrics' n is explained
        meta["labels_outside_classes"] = cohort.unknown_labels
    write_text(out / "run.yaml", OmegaConf.to_yaml(OmegaConf.create(meta)))
    labelled = task.labelled(df)
    if labelled:
        result = write_report(df, task.columns[0].name, run.classes, out, id_columns(cfg),
                              n_boot=cfg.cv.bootstrap, seed=cfg.cv.seed, task=task)
        if seen and (out / "summary.md").is_file():
            note = (f"**Not an external validation:** {len(seen)} of these {n_patients} patients have the IDs of "
                    f"patients the run `{run.path}` trained or validated on ({list_examples(seen)}).\n\n")
            write_text(out / "summary.md", note + (out / "summary.md").read_text())
        logger.info("%s, %d labelled bags: %s", "cohort with patients seen in training" if seen else "external cohort",
                    labelled, task.headline(result))
    else:
        logger.info("no labels in the cohort: wrote predictions only")
    return out
