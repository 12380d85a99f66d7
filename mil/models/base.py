"""The aggregator contract and the model registry.

Every aggregator is a plain ``nn.Module``: ``forward(features [B, N, D], mask [B, N])``
returns a :class:`MILOutput`. ``mask`` is boolean, True for real tiles; padded rows must
not change the output. Losses, metrics and training live elsewhere (``mil.training``).
A registry entry may carry ``train_defaults`` (see :func:`model_train_defaults`). Every aggregator
also has ``embedding_dim`` (the width E of ``MILOutput.embedding``) and
``classify(embedding [B, E]) -> logits [B, C]``, its bag head, with
``classify(out.embedding) == out.logits``: the shared hook through which covariates are fused
(:mod:`mil.fusion`) without touching attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mil.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model")


@dataclass
class MILOutput:
    """What an aggregator returns.

    logits:    [B, C] bag-level outputs (C = ``n_outputs``).
    attention: per-tile scores used for heatmaps: [B, N] (one map) or [B, C, N] (one per
               output), zero at padded positions; ``None`` for models without one.
    aux:       extra tensors an auxiliary loss needs (see ``aux_loss`` on the model class),
               e.g. CLAM's instance logits or DSMIL's instance scores.
    embedding: [B, E] the pooled bag embedding the model's head reads (per-class pooled vectors
               flattened for CLAM-MB and DSMIL); ``logits == model.classify(embedding)``.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None


def model_train_defaults(name: str) -> dict[str, Any]:
    """The training settings a model needs in place of the toolkit's defaults (``train.*`` keys).

    Declared in the model's registry entry, next to the model, e.g.
    ``@MODELS.register("dsmil", train_defaults={"lr": 1e-3})``, with the reason in a comment
    and the model's docstring. :func:`mil.config.load_config` applies them above the
    toolkit's defaults and below every YAML file and override, so ``train.lr=...`` still wins,
    and the saved ``config.yaml`` records the values used. Empty for most models.
    """
    return dict(MODELS.info(name).get("train_defaults", {}))


def parameter_groups(model: nn.Module, lr: float | None = None) -> list[dict[str, Any]]:
    """The trainable parameters of ``model``, grouped by learning-rate multiplier.

    A submodule declares a multiplier with a float attribute ``lr_scale`` (e.g. the attention
    network, :class:`mil.models.layers.AttentionPool`); a parameter takes the multiplier of the
    innermost module that declares one, 1.0 otherwise. Returns optimiser parameter groups
    ``[{"params": [...], "lr_scale": s}, ...]``, one per multiplier, in first-seen order; with
    ``lr`` each group also gets ``"lr": lr * s``, as the trainer uses them with ``train.lr`` (the
    scheduler scales all groups alike).
    The same idea as timm's per-layer learning-rate groups (``timm.optim.param_groups_layer_decay``).
    """
    scale_of: dict[int, float] = {}
    for name, module in sorted(model.named_modules(), key=lambda item: item[0].count(".") if item[0] else -1):
        scale = getattr(module, "lr_scale", None)
        if scale is None and name:
            continue  # inherits the enclosing module's multiplier (deeper modules come later)
        for param in module.parameters():
            scale_of[id(param)] = float(scale) if scale is not None else 1.0
    groups: dict[float, list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(scale_of.get(id(param), 1.0), []).append(param)
    out = [{"params": params, "lr_scale": scale} for scale, params in groups.items()]
    if lr is not None:
        for group in out:
            group["lr"] = lr * group["lr_scale"]
    return out


def create_model(name: str, in_dim: int, n_outputs: int, **kwargs: Any) -> nn.Module:
    """Build a registered aggregator, e.g. ``create_model("gated_abmil", 2560, 2)``.

    Unknown keyword arguments are an error that lists the ones the model accepts.
    """
    cls = MODELS.get(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = [p for p in params if p not in ("self", "in_dim", "n_outputs")]
        raise TypeError(f"model {name!r} got unknown argument(s) {unknown}; it accepts {accepted}")
    return cls(in_dim=in_dim, n_outputs=n_outputs, **kwargs)


def check_inputs(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and return a boolean mask ([B, N], all True when ``mask`` is None)."""
    assert features.ndim == 3, f"features must be [B, N, D], got {tuple(features.shape)}"
    if mask is None:
        return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    assert mask.shape == features.shape[:2], f"mask {tuple(mask.shape)} != features {tuple(features.shape[:2])}"
    return mask.bool()


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` that gives exactly zero weight to masked-out positions."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask
