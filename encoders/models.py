"""Tile encoders: one small registry entry per foundation model, one shared wrapper class.

An entry (:class:`EncoderSpec`) names the timm architecture and its arguments, the default
weights, the preprocessing and the official embedding recipe. :class:`TimmEncoder` turns
any entry into ``.model`` (forward returns all tokens), ``.transform``, ``.embed_dim`` and
``encode(images) -> [B, embed_dim]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import SwiGLUPacked

from encoders.preprocess import PreprocessSpec, TilePreprocess
from encoders.recipes import get_recipe, recipe_description, recipe_label
from encoders.weights import RANDOM, build_model, default_device
from mil.registry import Registry

logger = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    architecture: str  # timm model name
    model_kwargs: Mapping[str, Any]  # timm.create_model arguments (num_classes=0, global_pool="" forced)
    embedding: str  # official recipe (see encoders.recipes)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    default_weights: str | None = None  # used by `mil extract` when encoder.weights is unset
    description: str = ""


ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def register(spec: EncoderSpec) -> EncoderSpec:
    return ENCODERS.register(spec.name)(spec)


_SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
_VIRCHOW = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "dynamic_img_size": True,
    **_SWIGLU,
}

register(EncoderSpec(
    name="virchow",
    architecture="vit_huge_patch14_224",
    model_kwargs=_VIRCHOW,
    embedding="cls+mean_patch",
    default_weights="hf-hub:paige-ai/Virchow",
    description="Paige Virchow (ViT-H/14, 632M): 257 tokens, class ⊕ mean patch = 2,560-d",
))
register(EncoderSpec(
    name="virchow2",
    architecture="vit_huge_patch14_224",
    model_kwargs={**_VIRCHOW, "reg_tokens": 4},
    embedding="cls+mean_patch_excl_reg",
    default_weights="hf-hub:paige-ai/Virchow2",
    description="Paige Virchow2 (ViT-H/14, 4 registers): 261 tokens, class ⊕ mean patch = 2,560-d",
))
register(EncoderSpec(
    name="uni2-h",
    architecture="vit_giant_patch14_224",
    model_kwargs={
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
        "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
        "dynamic_img_size": True, **_SWIGLU,
    },
    embedding="cls",
    preprocess=PreprocessSpec(resize_px=224, interpolation="bilinear"),  # model card: Resize(224)
    default_weights="hf-hub:MahmoodLab/UNI2-h",
    description="MahmoodLab UNI2-h (ViT-H/14, 8 registers): class token, 1,536-d",
))
register(EncoderSpec(
    name="h-optimus-0",
    architecture="vit_giant_patch14_reg4_dinov2",
    model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    embedding="cls",
    # The model card feeds 224 px tiles at 0.5 mpp unresized; other tile sizes are resized.
    preprocess=PreprocessSpec(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
    default_weights="hf-hub:bioptimus/H-optimus-0",
    description="Bioptimus H-optimus-0 (ViT-g/14, 4 registers, 1.1B): class token, 1,536-d",
))
register(EncoderSpec(
    name="prov-gigapath",
    architecture="vit_giant_patch14_dinov2",
    model_kwargs={
        "img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
        "init_values": 1e-5, "mlp_ratio": 5.33334,
    },
    embedding="cls",
    preprocess=PreprocessSpec(resize_px=256, crop_px=224),  # Resize(256, bicubic), CenterCrop(224)
    default_weights="hf-hub:prov-gigapath/prov-gigapath",
    description="Prov-GigaPath tile encoder (ViT-g/16, 1.1B): class token, 1,536-d",
))
register(EncoderSpec(
    name="random-vit-tiny",
    architecture="vit_tiny_patch16_224",
    model_kwargs={
        "img_size": 224, "patch_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2,
        "reg_tokens": 4, "dynamic_img_size": True,
    },
    embedding="cls+mean_patch_excl_reg",
    default_weights=RANDOM,
    description="NOT FOR SCIENCE: a randomly initialised 2-layer ViT (4 registers, 128-d) for tests and demos",
))


class TimmEncoder:
    """A frozen timm ViT plus its preprocessing and embedding recipe."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: torch.nn.Module,
        weights_id: str,
        weights_source: str,
        embedding: str | None = None,
        device: torch.device | str = "cpu",
        precision: str = "bf16",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"encoder.precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.spec = spec
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.precision = precision
        self.transform = TilePreprocess(spec.preprocess)
        self.weights_id = weights_id
        self.weights_source = weights_source
        self.recipe = get_recipe(embedding or spec.embedding)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_reg_tokens = int(getattr(model, "num_reg_tokens", 0))
        self.token_dim = int(model.embed_dim)
        self.embed_dim = self.recipe.width * self.token_dim
        self.embedding = recipe_label(self.recipe.name, self.num_reg_tokens)

    @property
    def name(self) -> str:
        return self.spec.name

    def _autocast(self) -> AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if self.device.type != "cuda" or dtype is None:  # the CPU runs in float32
            return nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All output tokens ``[B, T, D]`` for normalised images ``[B, 3, H, W]``."""
        with self._autocast():
            return self.model(images.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> float32 embeddings ``[B, embed_dim]``."""
        return self.recipe.fn(self.tokens(images).float(), self.num_prefix_tokens)

    @torch.inference_mode()
    def encode_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 tiles from ``transform.to_uint8`` -> embeddings (normalised on the device)."""
        return self.encode(self.transform.normalize(images.to(self.device, non_blocking=True)))

    def bag_attrs(self) -> dict[str, Any]:
        """Provenance attributes recorded in every bag this encoder makes."""
        return {
            "encoder": self.name,
            "encoder_weights": self.weights_id,
            "encoder_weights_source": self.weights_source,
            "embedding": self.embedding,
            "embedding_detail": recipe_description(self.recipe.name, self.num_reg_tokens, self.token_dim),
            "encoder_architecture": self.spec.architecture,
        }

    def __repr__(self) -> str:
        return (f"TimmEncoder({self.name!r}, weights={self.weights_id!r}, embedding={self.embedding!r}, "
                f"embed_dim={self.embed_dim}, device={self.device})")


def create_encoder(
    name: str,
    weights: str | None = None,
    *,
    embedding: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
) -> TimmEncoder:
    """Build a registered encoder; ``weights=None`` means random initialisation (seeded).

    ``weights``: ``hf-hub:org/name``, a local folder in the hub's layout, or a weights file.
    ``embedding``: a recipe name (e.g. ``"cls"``) instead of the encoder's official one.
    ``device``: ``"auto"`` picks the GPU when there is one.
    """
    spec = ENCODERS.get(name)
    if embedding is not None:
        get_recipe(embedding)  # unknown recipe: fail before building a large model
    device = default_device(str(device)) if str(device) == "auto" else torch.device(device)
    loaded = build_model(spec.name, spec.architecture, spec.model_kwargs, weights, device)
    return TimmEncoder(spec, loaded.model, loaded.weights_id, loaded.source, embedding, device, precision)
