"""Attention-based MIL (Ilse, Tomczak & Welling, ICML 2018): plain and gated attention.

tiles -> per-tile MLP -> attention pooling (softmax over tiles) -> linear bag head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mil.models.base import MODELS, MILOutput, check_inputs
from mil.models.layers import AttentionPool, InstanceEmbedding


@MODELS.register("abmil")
class ABMIL(nn.Module):
    """Attention MIL with ``a = w^T tanh(V h)`` (Ilse et al. 2018, eq. 8).

    Options: ``hidden_dim`` (embedding width when ``embed_dims`` is None; 128), ``attn_dim``
    (width of the attention network), ``dropout`` (after each embedding layer),
    ``embed_dims`` (explicit embedding widths, e.g. ``[256, 128, 64]``), ``attn_lr_scale``
    (the attention network learns at this multiple of ``train.lr``; 1.0 is the paper's setting),
    ``attn_mask_top_k`` and ``attn_mask_fraction`` (stochastic top-k instance masking; off).
    Attention: [B, N], softmax over valid tiles.

    ``attn_lr_scale`` below 1 (e.g. 0.3) is for signals spread over many tiles. At the full rate
    the attention collapsed onto 4-8% of the tiles within ten epochs, also where a weak signal is
    carried by half of them, and gated ABMIL fell 0.11-0.19 AUROC below mean pooling on three such
    cohorts; at 0.3 it gained 0.03-0.08 there. The default stays the paper's 1.0 because the
    slower attention finds sparse witnesses later: on four draws of a 40-patient cohort with 8%
    witness tiles the default recipe lost 0.056 AUROC on average at 0.3, 0.18 on one draw
    (docs/benchmarks.md, "The attention's learning rate"). Where the signal is known to be
    diffuse, ``mean_pool`` is simpler still.

    ``attn_mask_top_k`` (0, off) turns on ACMIL's stochastic top-k instance masking in training
    (Zhang et al., ECCV 2024; their setting: 10 tiles, ``attn_mask_fraction`` 0.6 of them hidden
    per step; :func:`mil.models.layers.stochastic_top_k_mask`). With their setting the recipe
    suite's learnable families moved by -0.11 to +0.03 AUROC: up on decoys and a dense signal, down on a sparse
    near-normal signal and on small sparse cohorts (docs/benchmarks.md, "Stochastic top-k
    instance masking"), so it is an option, not the default.

    Width 128 rather than CLAM's 512: on five cohort families of ``benchmarks/recipe.py``
    (30-120 patients, 64-2,560-d) the pooled AUROC was higher on three (by 0.05-0.11) and
    lower on two (by 0.02-0.03), at a third to a half of the CPU time (docs/benchmarks.md, §5).
    """

    gated = False

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        *,
        hidden_dim: int = 128,
        attn_dim: int = 128,
        dropout: float = 0.25,
        embed_dims: Sequence[int] | None = None,
        attn_lr_scale: float = 1.0,
        attn_mask_top_k: int = 0,
        attn_mask_fraction: float = 0.6,
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, embed_dims, hidden_dim, dropout)
        self.pool = AttentionPool(self.embed.out_dim, attn_dim, n_branches=1, gated=self.gated, lr_scale=attn_lr_scale,
                                  mask_top_k=attn_mask_top_k, mask_fraction=attn_mask_fraction)
        self.head = nn.Linear(self.embed.out_dim, n_outputs)
        self.n_outputs = n_outputs
        self.embedding_dim = self.embed.out_dim

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, E] -> [B, C]."""
        return self.head(embedding)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_inputs(features, mask)  # [B, N]
        B, N, _ = features.shape
        h = self.embed(features)  # [B, N, E]
        pooled, weights = self.pool(h, mask)  # [B, 1, E], [B, 1, N]
        embedding = pooled[:, 0]  # [B, E]
        logits = self.classify(embedding)  # [B, C]
        assert logits.shape == (B, self.n_outputs) and weights.shape == (B, 1, N)
        return MILOutput(logits=logits, attention=weights[:, 0], embedding=embedding)  # attention [B, N]


@MODELS.register("gated_abmil")
class GatedABMIL(ABMIL):
    """Gated attention MIL: ``a = w^T (tanh(V h) * sigmoid(U h))`` (Ilse et al. 2018, eq. 9)."""

    gated = True
