"""TransMIL (Shao et al., NeurIPS 2021): transformer MIL with a pyramid position encoding.

tiles -> fc -> tokens padded to a square grid (repeating the first tokens, as in the paper)
-> [CLS] + tokens -> transformer layer -> PPEG (depthwise 7/5/3 convs on the grid)
-> transformer layer -> LayerNorm -> [CLS] -> linear head.

Deviations from the reference implementation, on purpose:

- Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels, O(L) memory) instead of the Nystrom approximation, so
  outputs do not depend on landmark choice or on how many tokens pad the sequence, and the
  [CLS] attention map is the one the model actually used. Nystrom's extra depthwise-conv
  residual on the values is therefore dropped too.
- Each bag is processed on its own valid tokens, so padding in a batch never changes a
  bag's output: the square-grid padding must be built from the bag's own tiles. Bags with
  the same number of valid tiles go through the network together.

Attention map: the [CLS] query's attention in the last layer, averaged over heads; a tile
repeated for the grid padding gets the sum over its copies; renormalised over tiles
(excluding the [CLS] token itself) so it sums to 1; zero on padding. [B, N].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mil.models.base import MODELS, MILOutput, check_inputs
from mil.models.layers import InstanceEmbedding


class TransLayer(nn.Module):
    """Pre-norm multi-head self-attention block with a residual: ``x + attn(norm(x))``."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.n_heads = n_heads

    def forward(self, x: torch.Tensor, cls_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, L, E] -> ([B, L, E], [CLS] attention over all L tokens averaged over heads [B, L] or None)."""
        B, L, E = x.shape
        H = self.n_heads
        qkv = self.qkv(self.norm(x)).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, d]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, d]
        y = y.transpose(1, 2).reshape(B, L, E)
        if not cls_attention:
            return x + self.out(y), None
        # Only the [CLS] row of the attention matrix is materialised: O(L) memory.
        cls_scores = (q[:, :, :1] @ k.transpose(-2, -1)) / math.sqrt(E // H)  # [B, H, 1, L]
        cls_attn = cls_scores.float().softmax(dim=-1).mean(dim=1)[:, 0]  # [B, L]
        return x + self.out(y), cls_attn


class PPEG(nn.Module):
    """Pyramid position encoding generator: tokens + depthwise conv 7x7 + 5x5 + 3x3 on the grid.

    The three centred depthwise convolutions are linear in the grid, so their sum is computed
    as one 7x7 depthwise convolution whose kernel is the sum of the three zero-padded kernels
    (and whose bias is the sum of the biases): the same function and the same parameters as
    the paper's three convolutions, at a third of the convolution calls (on the CPU, their
    backward pass was a third of a training step at 512 tiles).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 7x7 depthwise kernel [E, 1, 7, 7] and bias [E] equal to the sum of the three."""
        big = max(conv.kernel_size[0] for conv in self.convs)
        weight = sum(F.pad(c.weight, [(big - c.kernel_size[0]) // 2] * 4) for c in self.convs)
        bias = sum(c.bias for c in self.convs)
        return weight, bias

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """[B, 1 + side*side, E] -> same shape; the [CLS] tokens pass through unchanged."""
        B, L, E = x.shape
        assert L == 1 + side * side, f"{L} tokens do not fill a {side}x{side} grid plus [CLS]"
        cls_token, tokens = x[:, :1], x[:, 1:]
        # Token-major [B, S*S, E] is the channels-last layout of the [B, E, S, S] grid: a view, no
        # copy, and the CPU's depthwise convolution runs about twice as fast in that layout.
        grid = tokens.reshape(B, side, side, E).permute(0, 3, 1, 2)  # [B, E, S, S]
        weight, bias = self.merged_kernel()
        grid = grid + F.conv2d(grid, weight.to(grid.dtype), bias.to(grid.dtype), padding=weight.shape[-1] // 2, groups=E)
        return torch.cat([cls_token, grid.permute(0, 2, 3, 1).reshape(B, side * side, E)], dim=1)


# Training default (see mil.models.base.model_train_defaults): the reference implementation's
# learning rate, 2e-4 (Shao et al.'s Camelyon/TransMIL.yaml; they pair it with Lookahead-RAdam).
# At the toolkit's 5e-4 its 2.2 M parameters (at 512 wide) fit 24 training bags within five
# epochs. On four families of the recipe suite 2e-4 was as good or better (+0.00 to +0.03
# AUROC); on the two small sparse ones TransMIL still trails ABMIL by 0.11-0.14
# (docs/benchmarks.md, "TransMIL at its paper's learning rate").
@MODELS.register("transmil", train_defaults={"lr": 2e-4})
class TransMIL(nn.Module):
    """TransMIL with exact attention; see the module docstring for the choices made.

    Trains with ``train.lr=2e-4`` unless the config sets ``train.lr`` (its registry entry's
    ``train_defaults``; the reason is in the comment above the class).

    Options: ``hidden_dim`` (token width when ``embed_dims`` is None, 512), ``n_heads`` (8;
    must divide the width), ``dropout`` (after each attention output projection, 0.1),
    ``embed_dims`` (explicit fc widths; the last is the token width).
    """

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        *,
        hidden_dim: int = 512,
        n_heads: int = 8,
        dropout: float = 0.1,
        embed_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, embed_dims, hidden_dim, dropout=0.0)
        dim = self.embed.out_dim
        if dim % n_heads:
            raise ValueError(f"token width {dim} must be divisible by n_heads={n_heads}")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, n_heads, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, n_heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_outputs)
        self.n_outputs = n_outputs
        self.embedding_dim = dim

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, E] (the normalised [CLS] token) -> [B, C]."""
        return self.head(embedding)

    def forward_bags(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of equal size, their valid tokens only: [G, n, E] -> (normalised [CLS] embeddings [G, E], attention [G, n])."""
        G, n, _ = tokens.shape
        side = math.ceil(math.sqrt(n))
        extra = side * side - n  # < n for n >= 2, 0 for n == 1
        grid = torch.cat([tokens, tokens[:, :extra]], dim=1)  # [G, S*S, E]
        x = torch.cat([self.cls_token.to(grid.dtype).expand(G, -1, -1), grid], dim=1)  # [G, 1 + S*S, E]
        x, _ = self.layer1(x, cls_attention=False)
        x = self.ppeg(x, side)
        x, cls_attn = self.layer2(x)  # [G, 1 + S*S, E], [G, 1 + S*S]
        embedding = self.norm(x[:, 0])  # [G, E]
        tile_attn = cls_attn[:, 1:]  # [G, S*S], drop [CLS] -> itself
        tile_attn = tile_attn[:, :n].index_add(1, torch.arange(extra, device=x.device), tile_attn[:, n:])  # [G, n]
        return embedding, tile_attn / tile_attn.sum(dim=1, keepdim=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_inputs(features, mask)  # [B, N]
        B, N, _ = features.shape
        h = self.embed(features)  # [B, N, E]
        E = h.shape[-1]
        embedding = h.new_zeros(B, E)
        attention = h.new_zeros(B, N, dtype=torch.float32)
        # A bag sees only its own valid tokens (padding must not change it); bags with the same
        # number of valid tiles (every bag of a training batch with tile sampling) share one pass.
        counts = mask.sum(dim=1)  # [B]
        for n in counts.unique().tolist():
            rows = (counts == n).nonzero(as_tuple=True)[0]  # [G]
            tokens = h[rows][mask[rows]].view(len(rows), n, E)  # [G, n, E], tile order kept
            group_embedding, group_attn = self.forward_bags(tokens)
            embedding = embedding.index_put((rows,), group_embedding.to(embedding.dtype))
            attention[rows] = attention[rows].masked_scatter(mask[rows], group_attn.float())
        logits = self.classify(embedding)  # [B, C]
        assert logits.shape == (B, self.n_outputs)
        return MILOutput(logits=logits, attention=attention, embedding=embedding)
