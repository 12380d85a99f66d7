"""Building blocks shared by the aggregators: tile embedding, attention pooling, masked pools.

Shapes: B = bags, N = tiles (padded), D = input features, E = embedding width,
K = attention branches, C = outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mil.models.base import masked_softmax


class InstanceEmbedding(nn.Module):
    """Per-tile MLP: ``Linear -> ReLU -> Dropout`` for each width in ``embed_dims``.

    ``embed_dims=None`` means one layer of ``hidden_dim``; ``embed_dims=[]`` is the identity
    (use the encoder features as they are). The MI-Net embedding for low-dimensional
    benchmarks (Musk, Fox, ...) is ``embed_dims=[256, 128, 64]``.
    """

    def __init__(
        self,
        in_dim: int,
        embed_dims: Sequence[int] | None = None,
        hidden_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [hidden_dim] if embed_dims is None else [int(d) for d in embed_dims]
        if any(d <= 0 for d in dims):
            raise ValueError(f"embed_dims must be positive widths, got {dims}")
        layers: list[nn.Module] = []
        prev = in_dim
        for width in dims:
            layers += [nn.Linear(prev, width), nn.ReLU(), nn.Dropout(dropout)]
            prev = width
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = prev

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        assert features.shape[-1] == self.in_dim, f"expected {self.in_dim} features, got {features.shape[-1]}"
        return self.net(features)  # [..., D] -> [..., E]


class AttentionPool(nn.Module):
    """Attention pooling of Ilse et al. (2018), plain or gated, with ``K`` branches.

    plain: ``a_k = w_k^T tanh(V h)``; gated: ``a_k = w_k^T (tanh(V h) * sigmoid(U h))``;
    weights are a masked softmax over tiles. Returns pooled ``[B, K, E]`` and weights
    ``[B, K, N]`` (exactly zero on padding).

    ``lr_scale`` multiplies the learning rate of this module's parameters (read by
    :func:`mil.models.base.parameter_groups`): below 1 the attention learns more slowly than
    the tile embedding and the bag head. The models' defaults and why are in their docstrings.

    ``mask_top_k`` > 0 turns on stochastic top-k instance masking in training (see
    :func:`stochastic_top_k_mask`; Zhang et al., ACMIL, ECCV 2024): each step hides
    ``mask_fraction`` of the ``mask_top_k`` highest-scoring tiles of each bag and branch, so the
    pooled vector cannot rest on a handful of tiles. Evaluation always sees every tile.
    """

    def __init__(
        self,
        in_dim: int,
        attn_dim: int = 128,
        n_branches: int = 1,
        gated: bool = False,
        dropout: float = 0.0,
        lr_scale: float = 1.0,
        mask_top_k: int = 0,
        mask_fraction: float = 0.6,
    ) -> None:
        super().__init__()
        if not lr_scale > 0:
            raise ValueError(f"the attention's lr_scale (model.args.attn_lr_scale) must be > 0, got {lr_scale}")
        if int(mask_top_k) != mask_top_k or mask_top_k < 0:
            raise ValueError(f"model.args.attn_mask_top_k must be a whole number >= 0 (0: off), got {mask_top_k}")
        if not 0.0 <= mask_fraction < 1.0:
            raise ValueError(f"model.args.attn_mask_fraction must be in [0, 1), got {mask_fraction}")
        self.lr_scale = float(lr_scale)
        self.mask_top_k = int(mask_top_k)
        self.mask_fraction = float(mask_fraction)
        self.tanh_branch = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = (
            nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        # No bias: a constant shift of the scores cancels in the softmax, so it could never learn.
        self.score = nn.Linear(attn_dim, n_branches, bias=False)
        self.n_branches = n_branches

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores: [B, N, E] -> [B, K, N]."""
        a = self.tanh_branch(h)  # [B, N, A]
        if self.gate is not None:
            a = a * self.gate(h)  # [B, N, A]
        return self.score(a).transpose(1, 2)  # [B, K, N]

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = h.shape
        assert mask.shape == (B, N), f"mask {tuple(mask.shape)} != {(B, N)}"
        scores = self.scores(h)  # [B, K, N]
        valid = mask[:, None, :].expand_as(scores)  # [B, K, N]
        if self.training and self.mask_top_k:
            valid = stochastic_top_k_mask(scores.detach(), valid, self.mask_top_k, self.mask_fraction)
        weights = masked_softmax(scores, valid)  # [B, K, N]
        pooled = torch.bmm(weights.to(h.dtype), h)  # [B, K, E]
        assert pooled.shape == (B, self.n_branches, h.shape[-1])
        return pooled, weights


def stochastic_top_k_mask(scores: torch.Tensor, valid: torch.Tensor, k: int, fraction: float) -> torch.Tensor:
    """Stochastic top-k instance masking (STKIM; Zhang et al., "Attention-Challenging Multiple
    Instance Learning", ECCV 2024, whose setting is ``k=10``, ``fraction=0.6``).

    For every row (bag and branch), takes its ``k' = min(k, valid tiles)`` highest-scoring valid
    tiles and hides ``floor(k' * fraction)`` of them, chosen uniformly at random (``torch.rand``,
    so the global seed fixes them). At least one valid tile always stays.

    scores: [..., N] attention scores; valid: [..., N] bool, True on tiles the softmax may use.
    Returns the new bool mask [..., N] (``valid`` with the hidden tiles set to False).
    """
    assert scores.shape == valid.shape, f"scores {tuple(scores.shape)} != mask {tuple(valid.shape)}"
    n = scores.shape[-1]
    kk = min(k, n)
    if kk == 0:
        return valid
    top = scores.masked_fill(~valid, float("-inf")).topk(kk, dim=-1).indices  # [..., kk], best first
    k_row = valid.sum(dim=-1, keepdim=True).clamp(max=kk)  # [..., 1]: k' per row
    n_hide = (k_row * fraction).floor()  # [..., 1], < k' so one tile stays
    slot = torch.arange(kk, device=scores.device)
    draw = torch.rand(top.shape, device=scores.device).masked_fill(slot >= k_row, 2.0)  # slots past k' last
    rank = draw.argsort(dim=-1).argsort(dim=-1)  # [..., kk]: each slot's place in a random order
    hide = torch.zeros_like(valid).scatter(-1, top, rank < n_hide)  # [..., N]
    return valid & ~hide


class GroupedLinear(nn.Module):
    """``G`` independent linear maps applied to the same or to per-group inputs.

    Used for CLAM's per-class bag classifiers and per-class instance classifiers.
    Initialised like ``nn.Linear`` (uniform in ``±1/sqrt(in_dim)``).
    """

    def __init__(self, n_groups: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n_groups, out_dim, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_groups, out_dim).uniform_(-bound, bound))

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every group on every tile: [B, N, E] -> [B, G, N, O]."""
        out = torch.einsum("bne,goe->bgno", x, self.weight.to(x.dtype))
        return out + self.bias.to(out.dtype)[None, :, None, :]

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Group g on input g: [B, G, E] -> [B, G, O]."""
        out = torch.einsum("bge,goe->bgo", x, self.weight.to(x.dtype))
        return out + self.bias.to(out.dtype)[None]


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tiles: [B, N, E], [B, N] -> [B, E]."""
    m = mask[..., None].to(h.dtype)  # [B, N, 1]
    count = m.sum(dim=1).clamp(min=1.0)  # [B, 1]
    return (h * m).sum(dim=1) / count


def masked_max(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max over valid tiles: [B, N, E], [B, N] -> [B, E]."""
    return h.masked_fill(~mask[..., None], torch.finfo(h.dtype).min).amax(dim=1)
