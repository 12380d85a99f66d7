"""Helpers shared by the model tests."""

from __future__ import annotations

import torch


def pad(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags ([N_i, D] each) into features [B, N, D] and mask [B, N], with large random
    garbage (not zeros) in the padding, so a model that reads padded tiles is caught."""
    n_max, dim = max(len(b) for b in bags), bags[0].shape[1]
    x = torch.randn(len(bags), n_max, dim) * 50
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    return x, mask
