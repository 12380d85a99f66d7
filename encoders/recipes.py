"""Embedding recipes: how a tile embedding is made from a ViT's output tokens.

A timm ViT built with ``global_pool=""`` returns all tokens ``[B, T, D]``: the class token
first, then the register tokens (if any), then the patch tokens. Foundation models differ in
which of these they pool, and getting it subtly wrong (averaging the registers in, or keeping
only the class token without saying so) silently changes the feature space. Each recipe here
therefore has a name that is recorded in every bag's ``embedding`` attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mil.registry import Registry

EXCL_REG = "_excl_reg"


@dataclass(frozen=True)
class Recipe:
    """``fn(tokens [B, T, D], num_prefix_tokens) -> [B, width * D]``."""

    name: str
    width: int  # embedding size in multiples of the token width D
    fn: Callable[[torch.Tensor, int], torch.Tensor]
    uses_patches: bool
    description: str


RECIPES: Registry[Recipe] = Registry("embedding recipe")


def _cls(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    return tokens[:, 0]


def _mean_patch(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    # Patch tokens only: the class token and every register token are excluded.
    return tokens[:, num_prefix:].mean(dim=1)


def _cls_mean_patch(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    return torch.cat([_cls(tokens, num_prefix), _mean_patch(tokens, num_prefix)], dim=-1)


for _recipe in (
    Recipe("cls", 1, _cls, False, "class token"),
    Recipe("mean_patch", 1, _mean_patch, True, "mean of the patch tokens"),
    Recipe("cls+mean_patch", 2, _cls_mean_patch, True, "class token ⊕ mean of the patch tokens"),
):
    RECIPES.register(_recipe.name)(_recipe)


def get_recipe(name: str) -> Recipe:
    """Look a recipe up; ``..._excl_reg`` names are accepted (registers are always excluded)."""
    return RECIPES.get(name.removesuffix(EXCL_REG))


def recipe_label(name: str, num_reg_tokens: int) -> str:
    """The name recorded in bags: says ``_excl_reg`` when register tokens were left out."""
    recipe = get_recipe(name)
    return recipe.name + (EXCL_REG if recipe.uses_patches and num_reg_tokens > 0 else "")


def recipe_description(name: str, num_reg_tokens: int, token_dim: int) -> str:
    """A sentence for the bag attributes, e.g. for Virchow2's official recipe."""
    recipe = get_recipe(name)
    text = f"{recipe.description} ({recipe.width * token_dim}-d from {token_dim}-d tokens)"
    if recipe.uses_patches and num_reg_tokens > 0:
        text += f"; the {num_reg_tokens} register tokens (tokens 1-{num_reg_tokens}) are excluded"
    return text
