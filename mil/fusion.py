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

:class:`CovariatesOnly` is the covariates-only linear model of the ablation (:mod:`mil.ablation`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mil.models.base import MILOutput

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
