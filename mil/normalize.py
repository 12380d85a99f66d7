"""Per-dimension feature standardisation fitted on training bags only.

The statistics are buffers of :class:`Standardized`, so they are saved with the weights
and applied unchanged to validation, test and external bags.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mil.bags import read_features
from mil.cohort import Bag


class Standardized(nn.Module):
    """Wraps an aggregator: ``model((x - mean) / std, mask)``."""

    def __init__(self, model: nn.Module, dim: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.aux_loss = getattr(model, "aux_loss", None)
        self.aux_loss_kwargs = getattr(model, "aux_loss_kwargs", {})
        self.aux_loss_weight = getattr(model, "aux_loss_weight", 1.0)

    def fit(self, bags: list[Bag]) -> Standardized:
        """Set mean and std from every tile of ``bags`` (one streaming pass, float64 sums)."""
        total = np.zeros(self.mean.shape[0])
        total_sq = np.zeros_like(total)
        n = 0
        for bag in bags:
            for path in bag.paths:
                x = read_features(path).astype(np.float64)
                total += x.sum(0)
                total_sq += (x**2).sum(0)
                n += len(x)
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
        self.mean.copy_(torch.from_numpy(mean))
        self.std.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)))
        return self

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
        return self.model((features - self.mean) / self.std, mask, **kwargs)  # kwargs: e.g. covariates
