"""CLAM (Lu et al., Nature Biomedical Engineering 2021): gated attention + instance classifiers.

``clam_sb`` has one attention branch shared by all classes; ``clam_mb`` has one attention
branch and one bag classifier per class. Both have one binary instance classifier per class.
The instance-level clustering loss lives in :mod:`mil.losses` (``clam_instance``); the model
only returns what it needs in ``MILOutput.aux``:

- ``instance_logits`` [B, C, N, 2]: class c's instance classifier on every tile
  (index 1 = "evidence for class c").
- ``attention`` [B, C, N]: the attention used to pick class c's top/bottom tiles (the single
  branch repeated C times for ``clam_sb``), zero on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mil.models.base import MODELS, MILOutput, check_inputs
from mil.models.layers import AttentionPool, GroupedLinear, InstanceEmbedding


class _CLAMBase(nn.Module):
    """Shared body: embedding, gated attention with ``n_branches``, per-class instance heads.

    Options: ``hidden_dim`` (embedding width when ``embed_dims`` is None; CLAM "small" = 512),
    ``attn_dim`` (256), ``dropout`` (0.25, in the embedding and the attention network),
    ``embed_dims``, ``k_sample`` (tiles per side for the instance loss, 8), ``subtyping``
    (also push other classes' top tiles to negative; use for mutually exclusive subtypes),
    ``attn_lr_scale`` (the attention network learns at this multiple of ``train.lr``; 1.0, the
    paper's setting; below 1 for diffuse signals, see ABMIL's docstring).
    With ``n_outputs=1`` both variants have a single branch and a single instance classifier.
    """

    aux_loss = "clam_instance"
    aux_loss_weight = 0.3 / 0.7  # Lu et al. weigh bag and instance losses 0.7 / 0.3
    multi_branch: bool

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        *,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        embed_dims: Sequence[int] | None = None,
        k_sample: int = 8,
        subtyping: bool = False,
        attn_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1, got {k_sample}")
        self.embed = InstanceEmbedding(in_dim, embed_dims, hidden_dim, dropout)
        dim = self.embed.out_dim
        n_branches = n_outputs if self.multi_branch else 1
        self.pool = AttentionPool(dim, attn_dim, n_branches=n_branches, gated=True, dropout=dropout,
                                  lr_scale=attn_lr_scale)
        self.bag_classifier = self.build_bag_classifier(dim, n_outputs)
        self.instance_classifiers = GroupedLinear(n_outputs, dim, 2)
        self.n_outputs = n_outputs
        self.n_branches = n_branches
        self.embedding_dim = n_branches * dim
        self.aux_loss_kwargs: dict[str, Any] = {"k_sample": k_sample, "subtyping": subtyping}

    def build_bag_classifier(self, dim: int, n_outputs: int) -> nn.Module:
        raise NotImplementedError

    def bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, K, E] -> [B, C]."""
        raise NotImplementedError

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, K * E] (the K branches' pooled vectors, flattened) -> [B, C]."""
        return self.bag_logits(embedding.view(len(embedding), self.n_branches, -1))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_inputs(features, mask)  # [B, N]
        B, N, _ = features.shape
        C = self.n_outputs
        h = self.embed(features)  # [B, N, E]
        pooled, weights = self.pool(h, mask)  # [B, K, E], [B, K, N]
        embedding = pooled.reshape(B, -1)  # [B, K * E]
        logits = self.classify(embedding)  # [B, C]
        assert logits.shape == (B, C)
        instance_logits = self.instance_classifiers.forward_shared(h)  # [B, C, N, 2]
        assert instance_logits.shape == (B, C, N, 2)
        per_class = weights.expand(B, C, N)  # [B, C, N]
        attention = weights if self.multi_branch else weights[:, 0]  # [B, C, N] or [B, N]
        aux = {"instance_logits": instance_logits, "attention": per_class}
        return MILOutput(logits=logits, attention=attention, aux=aux, embedding=embedding)


@MODELS.register("clam_sb")
class CLAMSingleBranch(_CLAMBase):
    """CLAM-SB: one attention map [B, N], one linear bag classifier on the pooled embedding."""

    multi_branch = False

    def build_bag_classifier(self, dim: int, n_outputs: int) -> nn.Module:
        return nn.Linear(dim, n_outputs)

    def bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.bag_classifier(pooled[:, 0])  # [B, 1, E] -> [B, C]


@MODELS.register("clam_mb")
class CLAMMultiBranch(_CLAMBase):
    """CLAM-MB: one attention map per class [B, C, N]; class c's logit from its own pooled vector."""

    multi_branch = True

    def build_bag_classifier(self, dim: int, n_outputs: int) -> nn.Module:
        return GroupedLinear(n_outputs, dim, 1)  # one Linear(E, 1) per class

    def bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.bag_classifier.forward_grouped(pooled)[..., 0]  # [B, C, E] -> [B, C]
