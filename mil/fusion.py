"""Fusing encoded clinical covariates with the slide: one wrapper for every aggregator.

:class:`CovariateFusion` wraps any registry aggregator and works on the contract of
:mod:`mil.models.base`: the pooled bag embedding ``MILOutput.embedding`` [B, E] and the bag head
``model.classify``. Attention is computed by the wrapped model exactly as without covariates, so
heatmaps and the viewer keep working.

- ``late``: the covariates are concatenated to the pooled embedding before a linear head:
  ``head([e; c]) = W_e e + W_c c + b = classify(e) + W_c c``. The aggregator's own head provides
  ``W_e e + b`` and a new linear map ``W_c`` (no bias) adds the covariate term, which is exactly
  the concatenation for every registry head (all are linear in the embedding; for CLAM-MB the
  covariates join each class's pooled vector).
- ``film``: feature-wise linear modulation (Perez et al., "FiLM: Visual Reasoning with a General
  Conditioning Layer", AAAI 2018): ``e' = (1 + gamma(c)) * e + beta(c)`` with ``gamma, beta``
  linear in the covariates, initialised to zero (the identity), then the aggregator's head.

:class:`CovariatesOnly` is the covariates-only linear model of the ablation (:mod:`mil.ablation`),
fitted by :func:`fit_covariates_only`. The same fit warm-starts the covariate weights ``W_c`` of
late fusion (:func:`warm_start_late_fusion`): trained from scratch with the aggregator's small
learning rate, a handful of linear weights barely leave their initial values within the epochs a
MIL model trains (measured: benchmarks/covariate_ablation.py), so the fused model would ignore
covariates that a plain logistic / Cox / linear model uses well. Training then updates all weights
jointly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from mil.models.base import MILOutput

if TYPE_CHECKING:
    from mil.tasks import Task

FUSIONS = ("late", "film")


class CovariateFusion(nn.Module):
    """``model(features, mask)`` with encoded covariates [B, n_covariates] fused into its output.

    The wrapped model must expose ``embedding_dim``, ``classify`` and ``MILOutput.embedding``
    (every registry aggregator does). The returned ``embedding`` is the fused one:
    ``[e; c]`` for ``late``, the modulated ``e'`` for ``film``.
    """

    def __init__(self, model: nn.Module, n_covariates: int, fusion: str = "late") -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {FUSIONS}, got {fusion!r}")
        if n_covariates < 1:
            raise ValueError(f"fusion needs at least one encoded covariate, got {n_covariates}")
        for attr in ("embedding_dim", "classify", "n_outputs"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(model).__name__} has no {attr!r}: it does not follow the aggregator contract")
        self.model, self.fusion, self.n_covariates = model, fusion, n_covariates
        self.n_outputs = model.n_outputs
        if fusion == "late":
            self.covariate_head = nn.Linear(n_covariates, model.n_outputs, bias=False)
            nn.init.zeros_(self.covariate_head.weight)  # starts as the slide model (or warm-started)
        else:
            self.film = nn.Linear(n_covariates, 2 * model.embedding_dim)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.aux_loss = getattr(model, "aux_loss", None)
        self.aux_loss_kwargs = getattr(model, "aux_loss_kwargs", {})
        self.aux_loss_weight = getattr(model, "aux_loss_weight", 1.0)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, covariates: torch.Tensor | None = None
    ) -> MILOutput:
        if covariates is None:
            raise ValueError(
                f"this model was trained with {self.n_covariates} encoded covariates; pass covariates=[B, {self.n_covariates}]"
            )
        B = features.shape[0]
        assert covariates.shape == (B, self.n_covariates), f"covariates {tuple(covariates.shape)} != ({B}, {self.n_covariates})"
        out = self.model(features, mask)
        assert out.embedding is not None, f"{type(self.model).__name__} returned no embedding"
        c = covariates.to(out.embedding.dtype)
        if self.fusion == "late":
            logits = out.logits + self.covariate_head(c).to(out.logits.dtype)  # [B, C]
            embedding = torch.cat([out.embedding, c], dim=-1)  # [B, E + K]
        else:
            gamma, beta = self.film(c).chunk(2, dim=-1)  # [B, E] each
            embedding = (1 + gamma) * out.embedding + beta
            logits = self.model.classify(embedding)
        return dataclasses.replace(out, logits=logits, embedding=embedding)


class CovariatesOnly(nn.Module):
    """A linear model of the encoded covariates, ``logits = W c + b``; bags are ignored.

    Same call signature as an aggregator with covariates, so task wrappers, prediction and
    weight saving apply unchanged.
    """

    def __init__(self, n_covariates: int, n_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_covariates, n_outputs)
        self.n_outputs = n_outputs

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, covariates: torch.Tensor | None = None
    ) -> MILOutput:
        if covariates is None:
            raise ValueError("the covariates-only model needs covariates")
        return MILOutput(logits=self.linear(covariates.float()), embedding=covariates)


def fit_covariates_only(
    task: Task, x_train: torch.Tensor, train_targets: torch.Tensor, l2: float, max_iter: int = 500
) -> nn.Module:
    """A :class:`CovariatesOnly` model fitted on ``x_train`` [n, C] by full-batch L-BFGS.

    Minimises ``task loss + l2 / 2 * ||W||^2`` (bias unpenalised) with the task's own loss
    (cross-entropy: logistic regression; Cox partial likelihood: a Cox model; least squares:
    linear regression); the task's output wrapper (e.g. regression's scale) applies as in training
    the slide models. Deterministic: the weights start at zero. Returns the wrapped model (eval mode).
    """
    linear_model = CovariatesOnly(x_train.shape[1], task.n_outputs)
    nn.init.zeros_(linear_model.linear.weight)
    nn.init.zeros_(linear_model.linear.bias)
    model = task.wrap(linear_model, train_targets)
    loss_fn = task.make_loss(train_targets)
    weight = linear_model.linear.weight
    dummy = torch.zeros(len(x_train), 1, 1)  # no bag is read
    opt = torch.optim.LBFGS(linear_model.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(dummy, None, covariates=x_train).logits.float(), train_targets) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def warm_start_late_fusion(
    model: nn.Module, task: Task, x_train: torch.Tensor, train_targets: torch.Tensor, l2: float
) -> bool:
    """Set ``W_c`` of the late fusion inside ``model`` to the covariates-only fit on the training fold.

    Returns False (and changes nothing) when ``model`` has no late fusion.
    """
    fusion = next((m for m in model.modules() if isinstance(m, CovariateFusion)), None)
    if fusion is None or fusion.fusion != "late":
        return False
    fitted = fit_covariates_only(task, x_train, train_targets, l2)
    linear = next(m for m in fitted.modules() if isinstance(m, CovariatesOnly)).linear
    with torch.no_grad():
        fusion.covariate_head.weight.copy_(linear.weight)
    return True
