"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL with a critical-instance attention.

Stream 1 (instance classifier): per-tile class scores; the highest-scoring valid tile per
class is that class's *critical instance*. Stream 2 (bag classifier): each tile's query is
compared with the critical instance's query; a masked softmax of the scaled similarities
weights the tile values into one bag vector per class, and a linear layer over all class
vectors gives the bag logits (the original Conv1d(C, C, kernel=E) is exactly a Linear over
the flattened [C * E] input).

``aux["instance_logits"]`` [B, N, C] feeds the ``dsmil_max_instance`` loss in
:mod:`mil.losses`; ``aux["critical_index"]`` [B, C] is the critical tile of each class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mil.models.base import MODELS, MILOutput, check_inputs, masked_softmax
from mil.models.layers import InstanceEmbedding


# Training default (see mil.models.base.model_train_defaults): both of DSMIL's learning signals
# start from nothing. The critical-instance attention is bilinear in two small query vectors
# (near-uniform, i.e. mean pooling, at initialisation), and the max-instance loss moves one
# tile per bag, so it locks onto whichever tiles are salient first. At an lr of 2e-4
# (batch 1), on a cohort with 5% witness tiles, decoys in both classes and site shifts, its
# validation AUROC was 0.81 after 1,200 steps (gated ABMIL: 0.96), its critical instance a
# witness tile in 12% of positive bags; at 1e-3 it reached 0.94-1.00 within 600 steps on 4 of 4
# seeds, the critical instance a witness in 94-100% of positive bags in 3 of them (5e-4: 0.90
# after 700 steps on seed 0). On the suite's decoy_sites_40 it also beat 2e-4 (docs/benchmarks.md).
@MODELS.register("dsmil", train_defaults={"lr": 1e-3})
class DSMIL(nn.Module):
    """Dual-stream MIL. Attention: [B, C, N], one softmax over valid tiles per class.

    Trains with ``train.lr=1e-3`` unless the config sets ``train.lr`` (its registry entry's
    ``train_defaults``; the reason is in the comment above the class).

    The max-instance loss weighs a quarter of the bag loss (``aux_loss_weight = 0.25``; Li et
    al. weigh them equally, 1.0 here; ``train.aux_loss_weight`` overrides). Where the label
    means that a morphology is absent (positives lack tiles the negatives have), that loss has
    no tile to point at in a positive bag; at the paper's weight DSMIL lost 0.11-0.14 AUROC on
    such a synthetic family and on a dense and an imbalanced one (the numbers are at
    ``aux_loss_weight``).

    Where the witness tiles are few and only subtly different from a common tissue state (2%
    of tiles, 3 noise-sd away), DSMIL stays at chance while ABMIL learns: the max-instance loss
    trains the instance classifier through one tile per bag, so it never finds the witnesses,
    and the critical instance that centres the attention is then a random tile
    (``benchmarks/dsmil_streams.py``; docs/benchmarks.md, "Why DSMIL stays at chance").

    Options: ``hidden_dim`` (embedding width when ``embed_dims`` is None; ``embed_dims=[]``
    uses the features directly as in the original), ``dropout`` (embedding), ``embed_dims``,
    ``q_dim`` (query width, 128), ``nonlinear_q`` (two-layer tanh query network as in the
    original, else one Linear), ``passing_v`` (learned value projection instead of the
    identity), ``dropout_v`` (dropout before the value projection).
    """

    aux_loss = "dsmil_max_instance"
    # Li et al. weigh bag and max-instance losses 0.5 / 0.5 (1.0 here). Pooled AUROC under the
    # default recipe at weights 1.0 / 0.25 / 0 (docs/benchmarks.md, "DSMIL's max-instance loss weight"):
    #   chosen on:  witness_30 0.991 / 1.000 / 1.000; absence_60 0.867 / 0.978 / 0.980;
    #               decoy_sites_40 - / 1.000 / 1.000
    #   held out:   dense_100 0.754 / 0.879; imbalanced_200 0.850 / 0.989;
    #               near_normal_120 0.495 / 0.459 (chance at both)
    # 0.25, not 0: at 0 the instance classifier is never trained and the critical tile that
    # anchors the attention is picked by random weights.
    aux_loss_weight = 0.25

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        *,
        hidden_dim: int = 256,
        dropout: float = 0.25,
        embed_dims: Sequence[int] | None = None,
        q_dim: int = 128,
        nonlinear_q: bool = True,
        passing_v: bool = False,
        dropout_v: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, embed_dims, hidden_dim, dropout)
        dim = self.embed.out_dim
        self.instance_classifier = nn.Linear(dim, n_outputs)
        if nonlinear_q:
            self.query = nn.Sequential(nn.Linear(dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        else:
            self.query = nn.Linear(dim, q_dim)
        self.value: nn.Module = (
            nn.Sequential(nn.Dropout(dropout_v), nn.Linear(dim, dim), nn.ReLU())
            if passing_v
            else nn.Identity()
        )
        self.bag_classifier = nn.Linear(n_outputs * dim, n_outputs)  # == Conv1d(C, C, kernel_size=E)
        self.n_outputs = n_outputs
        self.embedding_dim = n_outputs * dim
        self.aux_loss_kwargs: dict[str, object] = {}
        self.scale = 1.0 / math.sqrt(q_dim)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, C * E] (the per-class bag vectors, flattened) -> [B, C]."""
        return self.bag_classifier(embedding)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_inputs(features, mask)  # [B, N]
        B, N, _ = features.shape
        C = self.n_outputs
        h = self.embed(features)  # [B, N, E]
        E = h.shape[-1]
        instance_logits = self.instance_classifier(h)  # [B, N, C]
        # Critical instance per class: the top-scoring *valid* tile (no gradient through argmax).
        masked = instance_logits.detach().masked_fill(~mask[..., None], float("-inf"))
        critical = masked.argmax(dim=1)  # [B, C]
        q = self.query(h)  # [B, N, Q]
        h_crit = torch.gather(h, 1, critical[..., None].expand(B, C, E))  # [B, C, E]
        q_crit = self.query(h_crit)  # [B, C, Q]
        sim = torch.bmm(q_crit, q.transpose(1, 2)) * self.scale  # [B, C, N]
        attention = masked_softmax(sim, mask[:, None, :])  # [B, C, N]
        v = self.value(h)  # [B, N, E]
        bag = torch.bmm(attention.to(v.dtype), v)  # [B, C, E]
        embedding = bag.reshape(B, C * E)  # [B, C * E]
        logits = self.classify(embedding)  # [B, C]
        assert logits.shape == (B, C) and attention.shape == (B, C, N)
        aux = {"instance_logits": instance_logits, "critical_index": critical}
        return MILOutput(logits=logits, attention=attention, aux=aux, embedding=embedding)
