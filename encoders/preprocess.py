"""Tile preprocessing: PIL tile -> resized uint8 array (in reading threads) -> normalised float.

The split lets reading threads fill uint8 batches (4x smaller than float32) and the
normalisation run on the encoder's device; ``TilePreprocess(img)`` does both, and equals
the torchvision ``Resize -> CenterCrop -> ToTensor -> Normalize`` chain of the model cards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """An encoder's input recipe.

    ``resize_px``: the shorter side is resized to this (torchvision ``Resize(int)``);
    ``crop_px``: then a centre crop of this size (``None``: no crop).
    """

    resize_px: int = 224
    crop_px: int | None = None
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation {self.interpolation!r}; expected one of {sorted(_INTERPOLATION)}")

    @property
    def input_px(self) -> int:
        return self.crop_px or self.resize_px


class TilePreprocess:
    """An encoder's preprocessing: :meth:`to_array` per tile, then :meth:`normalize` per batch."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        # (x / 255 - mean) / std as one multiply-subtract
        self._scale = (1.0 / (255.0 * torch.tensor(spec.std))).view(1, 3, 1, 1)
        self._shift = (torch.tensor(spec.mean) / torch.tensor(spec.std)).view(1, 3, 1, 1)

    def to_array(self, img: Image.Image) -> np.ndarray:
        """Resize and crop a tile; returns uint8 ``[H, W, 3]`` (channels last, as the image's pixels)."""
        if img.mode != "RGB":  # tiles from `read_tile` are RGB already: no per-tile copy
            img = img.convert("RGB")
        w, h = img.size
        short = min(w, h)
        if short != self.spec.resize_px:
            scale = self.spec.resize_px / short
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = img.resize(size, _INTERPOLATION[self.spec.interpolation])
        if self.spec.crop_px is not None:
            w, h = img.size
            c = self.spec.crop_px
            left, top = round((w - c) / 2), round((h - c) / 2)
            img = img.crop((left, top, left + c, top + c))
        return np.asarray(img)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """Resize and crop a tile; returns uint8 ``[3, H, W]``."""
        return torch.from_numpy(np.ascontiguousarray(self.to_array(img).transpose(2, 0, 1)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (any device, any memory layout) -> normalised, contiguous float32."""
        # one pass converts and lays out (a channels-last view of the reading threads' batches)
        x = images.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
        return x.mul_(self._scale.to(x.device)).sub_(self._shift.to(x.device))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL tile -> normalised float32 ``[3, H, W]``, the input of ``encode``."""
        return self.normalize(self.to_uint8(img)[None])[0]

    def __repr__(self) -> str:
        return f"TilePreprocess({self.spec})"
