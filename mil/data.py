"""Datasets and batching for bags: random tile subsets in training, full bags at evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mil.bags import read_features
from mil.cohort import Bag


class BagDataset(Dataset):
    """Yields ``{"features": [n, D] float16, "target": ..., "index": i}`` per bag.

    A patient-level bag concatenates its slides. With ``bag_size`` set, a fresh random
    subset of that many tiles is drawn on every access (so every epoch sees other tiles);
    the draw uses torch's RNG, which Lightning seeds per run and per worker.
    """

    def __init__(self, bags: Sequence[Bag], targets: torch.Tensor | None = None, bag_size: int | None = None) -> None:
        self.bags = list(bags)
        self.targets = targets
        self.bag_size = bag_size
        if targets is not None and len(targets) != len(self.bags):
            raise ValueError(f"{len(targets)} targets for {len(self.bags)} bags")

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        bag = self.bags[i]
        parts = [read_features(p) for p in bag.paths]
        x = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
        if self.bag_size is not None and len(x) > self.bag_size:
            keep = torch.randperm(len(x))[: self.bag_size].sort().values
            x = x[keep]
        item: dict[str, torch.Tensor | int] = {"features": x.to(torch.float16), "index": i}
        if self.targets is not None:
            item["target"] = self.targets[i]
        return item


def collate_bags(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad bags to the longest in the batch; ``mask`` is True for real tiles."""
    n_max = max(len(it["features"]) for it in items)
    dim = items[0]["features"].shape[1]
    features = torch.zeros(len(items), n_max, dim, dtype=items[0]["features"].dtype)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["features"])
        features[b, :n] = it["features"]
        mask[b, :n] = True
    batch = {"features": features, "mask": mask, "index": torch.tensor([it["index"] for it in items])}
    if "target" in items[0]:
        batch["target"] = torch.stack([torch.as_tensor(it["target"]) for it in items])
    return batch


def make_loader(dataset: BagDataset, batch_size: int, shuffle: bool, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_bags,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
