"""Non-attention baselines: masked mean and masked element-wise max of tile embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mil.models.base import MODELS, MILOutput, check_inputs
from mil.models.layers import InstanceEmbedding, masked_max, masked_mean


class _PoolingMIL(nn.Module):
    """Per-tile MLP, a fixed masked pool over tiles, then a linear bag head. No attention."""

    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        *,
        hidden_dim: int = 256,
        dropout: float = 0.25,
        embed_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, embed_dims, hidden_dim, dropout)
        self.head = nn.Linear(self.embed.out_dim, n_outputs)
        self.n_outputs = n_outputs
        self.embedding_dim = self.embed.out_dim

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, C]."""
        return self.head(embedding)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_inputs(features, mask)  # [B, N]
        h = self.embed(features)  # [B, N, E]
        bag = self.pool(h, mask)  # [B, E]
        logits = self.classify(bag)  # [B, C]
        assert logits.shape == (features.shape[0], self.n_outputs)
        return MILOutput(logits=logits, attention=None, embedding=bag)


@MODELS.register("mean_pool")
class MeanPoolMIL(_PoolingMIL):
    """Mean of the tile embeddings over valid tiles (options as in ``abmil``, no ``attn_dim``)."""

    pool = staticmethod(masked_mean)


@MODELS.register("max_pool")
class MaxPoolMIL(_PoolingMIL):
    """Element-wise max of the tile embeddings over valid tiles (MI-Net style)."""

    pool = staticmethod(masked_max)
