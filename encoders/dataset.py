"""Tiles of one slide as a Dataset, so DataLoader workers read and preprocess while the encoder runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from torch.utils.data import Dataset

from encoders.preprocess import TilePreprocess
from encoders.slides import open_slide
from encoders.tiling import TilePlan, read_tile


class SlideTiles(Dataset):
    """Item ``i``: the uint8 ``[3, H, W]`` model input of the tile at ``coords[i]``.

    Each process (the main one or a worker) opens its own OpenSlide handle on first use:
    handles cannot be pickled or shared across processes.
    """

    def __init__(self, path: Path, coords: np.ndarray, plan: TilePlan, preprocess: TilePreprocess) -> None:
        self.path = Path(path)
        self.coords = np.asarray(coords)
        self.plan = plan
        self.preprocess = preprocess
        self._slide: openslide.OpenSlide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self) -> openslide.OpenSlide:
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> torch.Tensor:
        x, y = self.coords[i]
        return self.preprocess.to_uint8(read_tile(self._handle(), self.path, int(x), int(y), self.plan))

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None, "_pid": None}
