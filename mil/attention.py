"""Per-tile attention of a trained run, averaged over its models, for the slides of a cohort.

Which attention (see each model's docstring for the shape it returns):

* ``abmil`` / ``gated_abmil``: the attention weights (softmax over tiles);
* ``clam_sb``: its single attention branch; ``clam_mb``: the branch of the class chosen below;
* ``dsmil``: the class's attention to its critical instance (softmax of query similarities);
* ``transmil``: the [CLS] token's attention in the last layer, averaged over heads;
* ``mean_pool`` / ``max_pool`` expose none: an error says so.

For per-class maps ([C, N]) the class is the ensemble's predicted class (the argmax of the
fold-averaged probabilities, one class for all folds so the maps can be averaged), or
``target_class`` when given; maps with C == 1 (one output) use their only row, and tasks
other than classification (no class probabilities) average the C maps.

Patient-level runs: the model is applied to the whole patient bag (the patient's slides
concatenated, as in training), because that is the attention the prediction used; for
TransMIL and DSMIL a tile's attention depends on the other slides' tiles. Each requested slide
then gets its slice, so a slide's raw scores sum to its share of the patient's attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from mil.bags import BagError, read_bag_info, read_features, read_tile_geometry
from mil.cohort import Bag, load_cohort, read_table
from mil.config import ConfigError
from mil.covariates import model_covariates, read_covariates
from mil.crossval import load_run_model
from mil.inference import resolve_device
from mil.models import MODELS, create_model
from mil.predict import Run, check_compatible


class HeatmapError(ValueError):
    """A heatmap that cannot be made; the message names the run, slide or bag at fault."""


@dataclass
class SlideAttention:
    """One slide's tiles and their ensemble attention."""

    slide_id: str
    bag: Bag
    bag_path: Path
    coords: np.ndarray  # [N, 2] level-0 top-left corners, the bag's order
    scores: np.ndarray  # [N] raw attention averaged over the run's models
    attrs: dict
    class_name: str | None  # the class whose attention map was used (None: a single map)
    probs: dict[str, float]  # the ensemble's probabilities for the bag (empty when unavailable)
    bag_tiles: int = 0  # tiles in the whole bag (all the patient's slides for patient-level bags)


def attention_models() -> list[str]:
    """Registered models whose output carries per-tile attention (probed on a tiny bag)."""
    names = []
    for name in MODELS.names():
        model = create_model(name, 8, 2).eval()
        with torch.inference_mode():
            if model(torch.zeros(1, 3, 8)).attention is not None:
                names.append(name)
    return names


@torch.inference_mode()
def ensemble_attention(
    models: list[torch.nn.Module], features: torch.Tensor, class_index: int | None = None, softmax: bool = True,
    covariates: list[torch.Tensor | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """One bag [N, D] through every model: attention [N] averaged over models, mean outputs [C], class row used.

    Per-output maps [C, N] use row ``class_index``, else (``softmax``: the outputs are class logits)
    the class with the highest mean probability, else (other tasks) the mean over outputs;
    the returned row is None when no single row was chosen. Outputs are probabilities when
    ``softmax``, raw otherwise. ``covariates``: per model, the bag's encoded covariates [C] (None for
    a model trained without); they change the outputs, never the attention.
    """
    logits, maps = [], []
    for i, model in enumerate(models):
        x = covariates[i] if covariates is not None else None
        out = model(features[None]) if x is None else model(features[None], covariates=x[None])
        if out.attention is None:
            raise HeatmapError(f"{type(model).__name__} returned no attention")
        logits.append(out.logits[0].float())
        maps.append(out.attention[0].float())  # [N] or [C, N]
    outputs = torch.stack(logits)
    outputs = (outputs.softmax(-1) if softmax else outputs).mean(0)
    att = torch.stack(maps).mean(0)
    used = None
    if att.ndim == 2:
        if att.shape[0] == 1:
            used = 0
        elif class_index is not None:
            used = class_index
        elif softmax:
            used = int(outputs.argmax())
        att = att.mean(0) if used is None else att[used]
    return att.cpu().numpy().astype(np.float64), outputs.cpu().numpy(), used


def slide_mpps(cfg: DictConfig) -> Callable[[str], float | None]:
    """Level-0 mpp of a slide from the config alone: the slide table's ``mpp`` column, else ``slides.mpp``.

    Used to place bags whose coordinates are in µm (STAMP); the command layer may pass a
    resolver that also reads the slide file's metadata.
    """
    table: dict[str, float] = {}
    if cfg.cohort.slide_csv:
        df = read_table(cfg.cohort.slide_csv, [cfg.cohort.slide_column], "slide table")
        if "mpp" in df.columns:
            values = pd.to_numeric(df["mpp"], errors="coerce")
            table = {str(s): float(v) for s, v in zip(df[cfg.cohort.slide_column], values, strict=True) if v > 0}
    fallback = None if cfg.slides.mpp is None else float(cfg.slides.mpp)
    return lambda slide_id: table.get(slide_id, fallback)


def slide_attention(run: Run, cfg: DictConfig, slide_ids: list[str], target_class: str | None = None,
                    slide_mpp: Callable[[str], float | None] | None = None) -> list[SlideAttention]:
    """Ensemble attention of each requested slide (each bag is run once, however many of its slides are asked).

    Coordinates are level-0 pixels; a bag that stores them in µm (STAMP) is converted with the
    slide's mpp from ``slide_mpp(slide_id)`` (default :func:`slide_mpps`), and its attributes
    gain the true ``tile_size_level0`` and ``slide_mpp`` (see :func:`mil.bags.read_tile_geometry`).
    """
    if not slide_ids:
        raise ConfigError("name at least one slide (--slide SLIDE_ID)")
    device = resolve_device(cfg.trainer.accelerator)
    models = [load_run_model(run.path, w).to(device).eval() for w in run.weights.values()]
    in_dim = int(run.meta.in_dim)
    with torch.inference_mode():
        encoder = getattr(models[0], "covariate_encoder", None)
        probe_kwargs = {"covariates": torch.zeros(1, encoder.dim, device=device)} if encoder is not None else {}
        probe = models[0](torch.zeros(1, 2, in_dim, device=device), **probe_kwargs)
    if probe.attention is None:
        raise HeatmapError(
            f"model {run.config.model.name!r} of run {run.path} exposes no per-tile attention "
            f"(it pools tiles without weighting them), so there is nothing to map; heatmaps need one of "
            f"{', '.join(attention_models())}")
    classification = str(run.config.task.type) == "classification"
    classes = [str(c) for c in (run.meta.get("classes") or [])] if classification else []
    class_index = None
    if target_class is not None:
        if target_class not in classes:
            raise ConfigError(f"class {target_class!r} is not one of the run's classes {classes}")
        class_index = classes.index(target_class)

    cohort = load_cohort(cfg.cohort, require_labels=False, columns=[])  # labels are not needed
    check_compatible(run, cohort)
    raw_covariates = read_covariates(cfg.cohort, cohort.bags, context=f" (the run {run.path} was trained with them)")
    by_slide = {sid: bag for bag in cohort.bags for sid in bag.slide_ids}
    unknown = [s for s in slide_ids if s not in by_slide]
    if unknown:
        skipped = dict(zip(cohort.skipped["id"], cohort.skipped["reason"], strict=False))
        why = "; ".join(f"{s}: {skipped.get(s, 'not in the slide table')}" for s in unknown[:5])
        raise HeatmapError(f"slide(s) not in the cohort of {cfg.cohort.slide_csv} with bags in "
                           f"{cfg.cohort.features_dir}: {why}")
    mpp_of = slide_mpp or slide_mpps(cfg)
    results = []
    bags = {by_slide[s].bag_id: by_slide[s] for s in slide_ids}  # each bag once, in request order
    for bag in bags.values():
        parts = [read_features(p) for p in bag.paths]
        x = torch.from_numpy(np.concatenate(parts)).float().to(device)
        covariates = [model_covariates(m, raw_covariates, [bag], f"{run.path} model {i}") for i, m in enumerate(models)]
        covariates = [None if c is None else torch.from_numpy(c[0]).to(device) for c in covariates]
        att, probs, used = ensemble_attention(models, x, class_index, softmax=bool(classes), covariates=covariates)
        prob_dict = {c: float(p) for c, p in zip(classes, probs, strict=True)} if len(probs) == len(classes) else {}
        start = 0
        for sid, path, part in zip(bag.slide_ids, bag.paths, parts, strict=True):
            n = len(part)
            if sid in slide_ids:
                attrs = read_bag_info(path).attrs
                try:
                    geometry = read_tile_geometry(path, mpp_of(sid))
                except BagError as e:
                    raise HeatmapError(str(e)) from None
                if geometry is None:
                    raise HeatmapError(f"{path}: the bag has no tile coordinates ('coords'); heatmaps need them")
                if geometry.unit != "px":  # now in level-0 pixels: record the geometry that places them
                    mpp = attrs.get("slide_mpp", mpp_of(sid))
                    attrs = {**attrs, "slide_mpp": mpp, "coords_unit_in_file": geometry.unit}
                    if geometry.tile_size_level0 is not None:
                        attrs["tile_size_level0"] = geometry.tile_size_level0
                results.append(SlideAttention(
                    sid, bag, path, geometry.coords, att[start:start + n], attrs,
                    None if used is None or len(classes) < 2 else classes[used], prob_dict, len(x)))
            start += n
    order = {s: i for i, s in enumerate(slide_ids)}
    return sorted(results, key=lambda r: order[r.slide_id])
