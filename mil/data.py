"""Datasets and batching for bags: random tile subsets in training, full bags at evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mil.bags import read_features
from mil.cohort import Bag

# Bags kept in memory per dataset after their first read. Opening an HDF5 file costs ~0.5 ms,
# which dominated epochs of small bags (Musk, Corel: 40% of training time); big slide bags
# beyond the budget are read from disk each time, where the read is cheap next to the model.
DEFAULT_CACHE_BYTES = 512 * 2**20


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t if t.dtype == torch.float16 else t.to(torch.float32)


class BagDataset(Dataset):
    """Yields ``{"features": [n, D], "target": ..., "index": i}`` per bag (+ ``"covariates"`` [C]).

    Features keep float16 when stored so (half the memory of collated batches); other
    dtypes (float32 bags of imported low-dimensional features) become float32, unrounded.
    A patient-level bag concatenates its slides. With ``bag_size`` set, a fresh random
    subset of that many tiles is drawn on every access (so every epoch sees other tiles);
    the draw uses torch's RNG, which Lightning seeds per run and per worker. Bags are
    cached in memory up to ``cache_bytes`` (0 disables the cache). ``covariates`` [n_bags, C]
    are a bag's encoded clinical covariates (:mod:`mil.covariates`), batched as [B, C].
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        targets: torch.Tensor | None = None,
        bag_size: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        covariates: torch.Tensor | None = None,
    ) -> None:
        self.bags = list(bags)
        self.targets = targets
        self.bag_size = bag_size
        self.cache_bytes = cache_bytes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached = 0
        self._row_bytes: float | None = None  # learnt from the first bag read
        if targets is not None and len(targets) != len(self.bags):
            raise ValueError(f"{len(targets)} targets for {len(self.bags)} bags")
        self.covariates = covariates
        if covariates is not None and len(covariates) != len(self.bags):
            raise ValueError(f"{len(covariates)} covariate rows for {len(self.bags)} bags")

    def _read(self, i: int) -> torch.Tensor:
        x = self._cache.get(i)
        if x is not None:
            return x
        parts = [read_features(p) for p in self.bags[i].paths]
        x = _as_tensor(parts[0] if len(parts) == 1 else np.concatenate(parts))
        self._row_bytes = x.nbytes / max(1, len(x))
        if self._cached + x.nbytes <= self.cache_bytes:
            self._cache[i] = x
            self._cached += x.nbytes
        return x

    def _fits_cache(self, bag: Bag) -> bool:
        return self._row_bytes is None or self._cached + bag.n_tiles * self._row_bytes <= self.cache_bytes

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        bag = self.bags[i]
        sample = self.bag_size is not None and bag.n_tiles > self.bag_size
        if sample and i not in self._cache and len(bag.paths) == 1 and not self._fits_cache(bag):
            # Check only the sampled rows: read_features' finiteness test of a whole 4,000 x 2,560
            # float16 bag costs 4x its read, and most of a training step's loading time.
            keep = torch.randperm(bag.n_tiles)[: self.bag_size].sort().values
            x = _as_tensor(read_features(bag.paths[0], keep.numpy()))
        else:
            x = self._read(i)
            if self.bag_size is not None and len(x) > self.bag_size:
                keep = torch.randperm(len(x))[: self.bag_size].sort().values
                x = x[keep]
        item: dict[str, torch.Tensor | int] = {"features": x, "index": i}
        if self.targets is not None:
            item["target"] = self.targets[i]
        if self.covariates is not None:
            item["covariates"] = self.covariates[i]
        return item


def collate_bags(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad bags to the longest in the batch; ``mask`` is True for real tiles."""
    n_max = max(len(it["features"]) for it in items)
    dim = items[0]["features"].shape[1]
    dtype = items[0]["features"].dtype
    for it in items[1:]:
        dtype = torch.promote_types(dtype, it["features"].dtype)
    features = torch.zeros(len(items), n_max, dim, dtype=dtype)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["features"])
        features[b, :n] = it["features"]
        mask[b, :n] = True
    batch = {"features": features, "mask": mask, "index": torch.tensor([it["index"] for it in items])}
    if "target" in items[0]:
        batch["target"] = torch.stack([torch.as_tensor(it["target"]) for it in items])
    if "covariates" in items[0]:
        batch["covariates"] = torch.stack([it["covariates"] for it in items])  # [B, C]
    return batch


class EvalShardSampler(DistributedSampler):
    """Evaluation order for several processes: each bag goes to exactly one process, none twice.

    PyTorch's ``DistributedSampler`` (which Lightning puts on validation loaders under DDP) pads
    the dataset to a multiple of the number of processes by repeating bags, so with 7 bags on 2
    processes bag 0 would be scored twice in the gathered validation metrics. Here process
    ``r`` of ``w`` gets bags ``r, r + w, r + 2w, ...``: shards differ in length by at most one.
    The process group is looked up when iterating (it does not exist yet when the loader is
    built); without one, every bag is yielded in order. Being a ``DistributedSampler``,
    Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        rank, world = self._world()
        return iter(range(rank, len(self.dataset), world))

    def __len__(self) -> int:
        rank, world = self._world()
        return len(range(rank, len(self.dataset), world))


def make_loader(
    dataset: BagDataset, batch_size: int, shuffle: bool, num_workers: int = 0, shard_across_processes: bool = False
) -> DataLoader:
    """Batches of padded bags. ``shard_across_processes`` (evaluation inside a distributed fit, e.g.
    the validation loader): each process gets its own bags, each bag exactly once
    (:class:`EvalShardSampler`); never for prediction after training, which scores every bag."""
    if shard_across_processes and shuffle:
        raise ValueError("shard_across_processes is for evaluation loaders (shuffle=False)")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if not shard_across_processes else None,
        sampler=EvalShardSampler(dataset) if shard_across_processes else None,
        num_workers=num_workers,
        collate_fn=collate_bags,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
