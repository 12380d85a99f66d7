"""Typed experiment configuration: dataclass schemas merged with YAML files and overrides.

``load_config(["configs/examples/msi.yaml", "train.lr=3e-4"])`` returns an OmegaConf
``DictConfig`` backed by :class:`Config`, so a typo in a key or a wrong type is an error
that names the key, and suggests the closest valid one.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

from mil.io import write_text

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file at fault."""


@dataclass
class CovariatesConfig:
    numeric: list[str] = field(default_factory=list)  # clinical columns standardised with training-fold statistics
    categorical: list[str] = field(default_factory=list)  # one-hot over the training fold's categories
    unseen_category: str = "error"  # category not seen in training: "error", or "other" (all-zero one-hot)


@dataclass
class CohortConfig:
    clinical_csv: str | None = None  # one row per patient: patient id + label columns
    slide_csv: str | None = None  # patient id + slide id (+ slide-level labels, optional mpp)
    features_dir: str | None = None  # one <slide_id>.h5 bag per slide
    patient_column: str = "patient_id"
    slide_column: str = "slide_id"
    target: str | None = None
    classes: list[str] | None = None  # ordered; the last is the positive class for binary metrics
    bag_level: str = "patient"  # "patient": all slides of a patient in one bag; "slide": one bag per slide
    # What bags from other tools do not record (encoder, encoder_weights, embedding, mpp, tile_px), e.g.
    # {encoder: uni2-h, mpp: 0.5, tile_px: 224}; a bag that records another value is an error
    bag_identity: dict[str, Any] = field(default_factory=dict)
    covariates: CovariatesConfig = field(default_factory=CovariatesConfig)  # fused with the slide (model.fusion)


@dataclass
class ModelConfig:
    name: str = "gated_abmil"
    args: dict[str, Any] = field(default_factory=dict)  # passed to the model's constructor
    fusion: str = "late"  # with cohort.covariates: "late" (concatenate before the head) or "film" (Perez et al. 2018)


@dataclass
class CVConfig:
    folds: int = 5
    repeats: int = 1
    seed: int = 0
    split_file: str | None = None  # reuse a splits.yaml exactly
    val_fraction: float = 0.2  # inner validation split of each training fold (early stopping)
    # k >= 2: k models on k inner splits of each training fold (each validated on one part) instead of one
    # val_fraction split (0). train.refit=false: they are kept, and the fold predicts with their average (an
    # ensemble); train.refit=true: they choose the epoch (and threshold), then one model trains on all of them.
    # A class with fewer training patients than k lowers k.
    inner_folds: int = 3
    bootstrap: int = 1000  # resamples for the 95% confidence intervals of pooled metrics
    ablation: bool = False  # with cohort.covariates: also train slide-only and covariates-only models on the same folds
    # Folds trained at once as processes on this machine: a number, or "auto" (on the CPU, up to one per
    # core; on a GPU, one). Results do not depend on it, beyond the last bits of float sums over threads.
    jobs: Any = "auto"


@dataclass
class TrainConfig:
    # The budget: max_epochs, raised so that at least min_steps optimiser steps run (small cohorts).
    max_epochs: int = 20
    min_steps: int = 1000
    min_epochs: int = 5  # no early stop before this (with patience set)
    batch_size: int = 1  # bags per optimiser step
    bag_size: int | None = 512  # tiles sampled per bag in training (None: full bags)
    eval_batch_size: int = 1  # full bags at evaluation
    optimizer: str = "adamw"  # "adamw", "adam" (L2 in the gradient) or "sgd" (with momentum)
    lr: float = 5e-4
    weight_decay: float = 1e-2
    momentum: float = 0.9  # sgd only
    scheduler: str = "constant"  # after warm-up: "constant", "cosine" (to min_lr_ratio * lr); "none": no warm-up
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine only
    monitor: str = "auto"  # "auto": the task's (AUROC for classification); or val_loss, val_auroc, val_ap, ...
    monitor_window: int = 5  # validation epochs averaged (trailing) before comparing
    selection: str = "auto"  # "best": the epoch with the best smoothed monitor; "last": the final weights;
    # "auto": "best" when the validation split has min_val_bags of every class (4x that for other tasks)
    min_val_bags: int = 10
    patience: int | None = None  # stop after this many epochs without a better smoothed monitor (None: never)
    # After the validation split(s) have chosen the epoch (and the threshold), train a new model on train +
    # validation for that many epochs and use it (about 2x the training time). Off by default: the inner models
    # of cv.inner_folds are averaged instead. With cv.inner_folds=0, true lets every non-test patient train.
    refit: bool = False
    standardize: bool = False  # z-score each feature with training-fold statistics (low-dim features)
    class_weighted: bool = True  # weight each bag's loss by inverse class frequency
    aux_loss_weight: float | None = None  # weight of a model's auxiliary loss (CLAM, DSMIL); None: the model's own
    precision: str = "32-true"  # Lightning precision: "32-true", "bf16-mixed", "16-mixed"
    num_workers: int = 0
    seed: int = 0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1  # int or "auto"
    strategy: str = "auto"  # "ddp" for several GPUs
    logger: str = "csv"  # "csv", "tensorboard", "mlflow" or "none"
    enable_progress_bar: Any = "auto"  # true, false, or "auto": bars on a terminal, one log line per epoch otherwise
    deterministic: bool = True


@dataclass
class SlidesConfig:
    dir: str | None = None  # folder of whole-slide images
    csv: str | None = None  # optional: slide id + path columns (and optional mpp)
    slide_column: str = "slide_id"
    path_column: str = "path"
    extensions: list[str] = field(
        default_factory=lambda: [".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".bif", ".dcm"]
    )
    mpp: float | None = None  # override for slides without resolution metadata


@dataclass
class TilingConfig:
    mpp: float = 0.5  # microns per pixel of every tile
    tile_px: int = 224
    min_tissue: float = 0.5  # minimum tissue fraction of a kept tile
    thumbnail_px: int = 2048  # longest side of the thumbnail used for tissue detection and QC


@dataclass
class EncoderConfig:
    name: str = "virchow2"
    weights: str | None = None  # hub id (hf-hub:...), local folder or file; None = registry default
    batch_size: int = 64
    precision: str = "bf16"  # autocast on GPU: "bf16", "fp16" or "fp32"
    embedding: str | None = None  # None = the encoder's official recipe; e.g. "cls" for the class token only
    device: str = "auto"


@dataclass
class TargetConfig:
    column: str | None = None  # label column (clinical or slide table)
    classes: list[str] | None = None  # ordered, last = positive; None: sorted values found


@dataclass
class TaskConfig:
    # classification (cohort.target, cohort.classes), multi_target (task.targets),
    # regression (cohort.target, numeric) or survival (task.time, task.event)
    type: str = "classification"
    targets: list[TargetConfig] = field(default_factory=list)  # multi_target: one head per target
    stratify: str | None = None  # multi_target: target column the splits are stratified on (None: the first)
    time: str | None = None  # survival: follow-up time column (>= 0, any unit)
    event: str | None = None  # survival: event column (1 = event, 0 = censored)
    loss: str | None = None  # None: the task's default; regression: "mse" (default) or "huber"
    huber_delta: float = 1.0  # regression: Huber threshold, in standard deviations of the training targets
    # binary classification: how the call's threshold on P(positive) is chosen on the validation split
    threshold: str = "youden"  # "youden", "sensitivity", "specificity" or "fixed" (see mil/thresholds.py)
    threshold_target: float | None = None  # the sensitivity / specificity to reach, or the fixed threshold


@dataclass
class LoaderConfig:
    workers: int | None = None  # tile-reading threads of `mil extract` (0: the main thread); None: min(4, usable cores)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(limit: int = 4) -> int:
    """``min(limit, usable cores)``: more reading threads than cores only adds contention."""
    return max(0, min(limit, usable_cores()))


@dataclass
class LauncherConfig:
    """Resources of each fold's job under ``mil crossval --launcher slurm`` (submitit)."""

    partition: str | None = None  # SLURM partition (None: the cluster's default)
    time: int = 240  # minutes per fold job
    gpus: int = 0  # GPUs per fold job (e.g. 1 with trainer.accelerator=gpu)
    cpus: int = 4  # CPU cores per fold job
    mem: int = 32  # GiB of memory per fold job


@dataclass
class Config:
    cohort: CohortConfig = field(default_factory=CohortConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    slides: SlidesConfig = field(default_factory=SlidesConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    features_dir: str | None = None  # where `mil extract` writes bags
    output_dir: str = "runs/default"


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value, as opposed to a YAML path
# Sub-trees whose keys are free-form (passed through to a constructor).
_FREE_FORM = {"model.args", "cohort.bag_identity"}


def _schema_keys(node: Any, prefix: str = "") -> set[str]:
    keys = set()
    for key in node:
        dotted = f"{prefix}{key}"
        keys.add(dotted)
        child = node[key] if isinstance(node, DictConfig) else None
        if isinstance(child, DictConfig) and dotted not in _FREE_FORM:
            keys |= _schema_keys(child, dotted + ".")
    return keys


# Other names users give config keys (by last segment), mapped to this schema's names. A
# synonym is only suggested when its target is a key of the schema.
KEY_SYNONYMS = {
    "learning_rate": "lr", "learningrate": "lr", "base_lr": "lr", "epochs": "max_epochs", "num_epochs": "max_epochs",
    "n_epochs": "max_epochs", "max_epoch": "max_epochs", "wd": "weight_decay", "bs": "batch_size",
    "batchsize": "batch_size", "workers": "num_workers", "gpus": "devices", "n_folds": "folds", "num_folds": "folds",
    "k_folds": "folds", "nfolds": "folds", "label": "target", "label_column": "target", "target_column": "target",
    "labels": "classes", "class_names": "classes", "early_stopping_patience": "patience", "patient_col": "patient_column",
    "slide_col": "slide_column", "feature_dir": "features_dir", "feats_dir": "features_dir", "feat_dir": "features_dir",
    "model_name": "name", "arch": "name", "architecture": "name", "output": "output_dir", "out_dir": "output_dir",
    "mixed_precision": "precision", "amp": "precision", "random_seed": "seed",
}


def suggest_key(dotted: str, valid: Iterable[str]) -> str | None:
    """The valid key a mistyped or foreign ``dotted`` key most likely means, or None.

    In order: a key with the same last segment or its synonym (``train.learning_rate`` ->
    ``train.lr``, ``epochs`` -> ``train.max_epochs``), preferring the same section; a close
    spelling of the last segment in the same section, then anywhere; a close spelling of the
    whole key.
    """
    valid = sorted(valid)
    section, _, leaf = dotted.rpartition(".")
    leaves = {k: k.rpartition(".")[2] for k in valid}
    wanted = {leaf.lower(), KEY_SYNONYMS.get(leaf.lower(), leaf.lower())}

    def best(keys: list[str]) -> str | None:
        if not keys:
            return None
        same = [k for k in keys if k.rpartition(".")[0] == section]
        return (same or sorted(keys, key=lambda k: (k.count("."), k)))[0]

    found = best([k for k, last in leaves.items() if last.lower() in wanted and k != dotted])
    if found:
        return found
    for pool in ([k for k in valid if k.rpartition(".")[0] == section], valid):
        names = sorted({leaves[k] for k in pool})
        close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
        if close:
            return best([k for k in pool if leaves[k] == close[0]])
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _check_keys(user: DictConfig, schema: DictConfig, source: str) -> None:
    valid = _schema_keys(schema)

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            dotted = f"{prefix}{key}"
            if dotted not in valid:
                close = suggest_key(dotted, valid)
                hint = f"; did you mean {close!r}?" if close else ""
                raise ConfigError(f"{source}: unknown config key {dotted!r}{hint}")
            child = node._get_node(key)
            if isinstance(child, DictConfig) and dotted not in _FREE_FORM and not child._is_none():
                walk(child, dotted + ".")

    walk(user, "")


def _check_booleans(user: Any, schema: Any, source: str, prefix: str = "") -> None:
    """Refuse a YAML boolean where the schema wants text (class names, ids, column names).

    YAML 1.1 reads unquoted ``no``/``yes``, ``off``/``on``, ``false``/``true`` as booleans,
    which would silently become the strings 'False'/'True'.
    """
    if isinstance(user, DictConfig) and isinstance(schema, DictConfig):
        for key in user:
            if key in schema and f"{prefix}{key}" not in _FREE_FORM:
                _check_booleans(user._get_node(key), schema._get_node(key), source, f"{prefix}{key}.")
        return
    dotted = prefix.rstrip(".")
    if isinstance(user, ListConfig) and isinstance(schema, ListConfig) and not user._is_none():
        element = schema._metadata.element_type
        for i, item in enumerate(user):
            if element is str and isinstance(item, bool):
                raise ConfigError(
                    f"{source}: {dotted} item {i} is the YAML boolean {item}: unquoted no/yes, off/on and "
                    f"false/true are read as booleans, so it would become {str(item)!r}; quote the names "
                    f"(e.g. {dotted.rpartition('.')[2]}: ['no', 'yes'])")
            if isinstance(element, type) and is_dataclass(element) and isinstance(user._get_node(i), DictConfig):
                _check_booleans(user._get_node(i), OmegaConf.structured(element), source, f"{dotted}[{i}].")
        return
    if isinstance(schema, StringNode) and isinstance(getattr(user, "_value", lambda: None)(), bool):
        raise ConfigError(
            f"{source}: {dotted} is the YAML boolean {user._value()}: unquoted no/yes, off/on and false/true are read "
            f"as booleans; quote the value (e.g. {dotted.rpartition('.')[2]}: 'yes')")


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise ConfigError(f"config file {path}{where} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return cfg


def load_config(sources: Sequence[str] | None = None, base: DictConfig | None = None) -> DictConfig:
    """Merge the schema defaults, YAML files and ``key=value`` overrides, in order.

    ``sources`` mixes YAML paths and dotted overrides (``train.lr=1e-3``); ``base`` is an
    already-resolved config to start from (e.g. a saved run's ``config.yaml``).
    """
    schema = OmegaConf.structured(Config)
    cfg = _merge_sources(schema, sources, base)
    # The chosen model's own training defaults (its registry entry, see mil.models.base) sit
    # between the toolkit's defaults and everything the user gave, so explicit keys still win.
    defaults = _model_train_defaults(cfg.model.name)
    if defaults:
        source = f"train_defaults of model {cfg.model.name!r}"
        cfg = _merge_sources(_merge(schema, OmegaConf.create({"train": defaults}), source), sources, base)
        used = {k: v for k, v in defaults.items() if cfg.train[k] == v}
        if used:
            logger.info("model %r trains with its own defaults %s (set train.<key> to override)",
                        cfg.model.name, ", ".join(f"train.{k}={v}" for k, v in used.items()))
    problems = _model_name_problems(cfg.model.name) + _range_problems(cfg)
    if problems:
        raise ConfigError(f"invalid setting{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}")
    return cfg


# train.* numbers and the values they may take: checked when the config is loaded, so a bad value is
# named by its key before any table is read or bag scanned, not by the optimiser or the trainer later.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_epochs": (lambda v: v >= 1, ">= 1"),
    "min_steps": (lambda v: v >= 0, ">= 0"),
    "min_epochs": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "bag_size": (lambda v: v is None or v >= 1, ">= 1, or null for full bags"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "monitor_window": (lambda v: v >= 1, ">= 1"),
    "min_val_bags": (lambda v: v >= 1, ">= 1"),
    "patience": (lambda v: v is None or v >= 1, ">= 1, or null for no early stopping"),
    "aux_loss_weight": (lambda v: v is None or v >= 0, ">= 0, or null for the model's own"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
}


def _range_problems(cfg: DictConfig) -> list[str]:
    """Every ``train.*`` value outside its range (see ``_RANGES``), each with the range it must be in."""
    return [f"train.{key}={cfg.train[key]} (must be {allowed})" for key, (ok, allowed) in _RANGES.items()
            if not ok(cfg.train[key])]


def _model_name_problems(name: str) -> list[str]:
    """An unknown ``model.name``, with the registry's suggestion (so it fails when the config is loaded)."""
    from mil.models import MODELS  # lazy: the models import torch

    try:
        MODELS.get(name)
    except KeyError as e:
        return [f"model.name: {e}"]
    return []


def _merge_sources(cfg: DictConfig, sources: Sequence[str] | None, base: DictConfig | None) -> DictConfig:
    if base is not None:
        cfg = _merge(cfg, base, "base config")
    for item in sources or []:
        if _OVERRIDE.match(item):
            user = OmegaConf.from_dotlist([item])
            cfg = _merge(cfg, user, f"override {item!r}")
        else:
            path = Path(item)
            cfg = _merge(cfg, _load_yaml(path), str(path))
    return cfg


def _model_train_defaults(name: str) -> dict[str, Any]:
    from mil.models import MODELS, model_train_defaults  # lazy: the models import torch

    return model_train_defaults(name) if name in MODELS else {}  # unknown: create_model names it


def _merge(cfg: DictConfig, user: DictConfig, source: str) -> DictConfig:
    schema = OmegaConf.structured(Config)
    _check_keys(user, schema, source)
    _check_booleans(user, schema, source)
    try:
        return OmegaConf.merge(cfg, user)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{source}: invalid value for {key or 'a key'}: {str(e).splitlines()[0]}") from None


def require(cfg: DictConfig, keys: Iterable[str], command: str) -> None:
    """Fail with one message listing every required key that is unset."""
    missing = [k for k in keys if OmegaConf.select(cfg, k) in (None, "")]
    if missing:
        raise ConfigError(
            f"`mil {command}` needs {', '.join(missing)}; set them in the YAML or as overrides "
            f"(e.g. {missing[0]}=...)"
        )


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of ``cfg`` (resolved), e.g. ``{"train.lr": 0.0005, ...}``."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def config_changes(before: Mapping[str, Any], now: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """``"key: old -> new"`` for each key of two :func:`flat_config` dicts whose values differ, sorted by key.

    A key missing on one side shows as None there; keys in ``ignore`` are left out.
    """
    keys = sorted(k for k in before.keys() | now.keys() if k not in ignore and before.get(k) != now.get(k))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config atomically."""
    write_text(path, to_yaml(cfg))


def as_list(value: ListConfig | list | None) -> list | None:
    return None if value is None else list(value)
