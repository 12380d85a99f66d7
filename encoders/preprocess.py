"""Tile preprocessing: PIL tile -> resized uint8 tensor (in loader workers) -> normalised float.

The split lets DataLoader workers ship uint8 tensors (4x smaller than float32) and the
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
    """Picklable, so DataLoader workers can run :meth:`to_uint8`."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        # (x / 255 - mean) / std as one multiply-subtract
        self._scale = (1.0 / (255.0 * torch.tensor(spec.std))).view(1, 3, 1, 1)
        self._shift = (torch.tensor(spec.mean) / torch.tensor(spec.std)).view(1, 3, 1, 1)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """Resize and crop a tile; returns uint8 ``[3, H, W]``."""
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
        # numpy, not torch, for the HWC -> CHW copy: single-threaded and cheap in any process
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))

    @staticmethod
    def collate(tiles: list[torch.Tensor]) -> torch.Tensor:
        """Stack uint8 tiles into a batch (DataLoader ``collate_fn``; numpy avoids thread overhead)."""
        return torch.from_numpy(np.stack([t.numpy() for t in tiles]))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (any device) -> normalised float32."""
        x = images.to(dtype=torch.float32, copy=True)  # never scale the caller's tensor in place
        return x.mul_(self._scale.to(x.device)).sub_(self._shift.to(x.device))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL tile -> normalised float32 ``[3, H, W]``, the input of ``encode``."""
        return self.normalize(self.to_uint8(img)[None])[0]

    def __repr__(self) -> str:
        return f"TilePreprocess({self.spec})"
