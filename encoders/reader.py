"""Reading a slide's kept tiles in batches, in reading threads, while the encoder runs.

Threads rather than DataLoader worker processes: OpenSlide's decoding and Pillow's resampling
release the GIL, so threads read in parallel. Each batch is written once, into its own array
(no per-tile tensors, no collate, no copy into shared memory), no process is forked per slide,
and the next slide's preparation can run beside the reading at any time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import torch

from encoders.preprocess import TilePreprocess
from encoders.slides import open_slide
from encoders.tiling import TilePlan, read_tile


class SlideTiles:
    """The tiles at ``coords`` of one slide, read as uint8 batches ``[n, H, W, 3]`` (channels last).

    ``H = W = preprocess.spec.input_px``. Every thread opens its own OpenSlide handle on first
    use; :meth:`close` closes them all. ``pin_memory``: allocate batches in page-locked memory,
    for fast copies to a GPU.
    """

    def __init__(self, path: Path, coords: np.ndarray, plan: TilePlan, preprocess: TilePreprocess,
                 pin_memory: bool = False) -> None:
        self.path = Path(path)
        self.coords = np.asarray(coords)
        self.plan = plan
        self.preprocess = preprocess
        self.pin_memory = pin_memory
        self._local = threading.local()
        self._handles: list[openslide.OpenSlide] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self) -> openslide.OpenSlide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._local.slide = open_slide(self.path)
            with self._lock:
                self._handles.append(slide)
        return slide

    def read_batch(self, start: int, stop: int) -> torch.Tensor:
        """Tiles ``start:stop`` as uint8 ``[stop - start, H, W, 3]``; raises :class:`SlideError` naming the file."""
        slide, px = self._handle(), self.preprocess.spec.input_px
        batch = torch.empty((stop - start, px, px, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        out = batch.numpy()
        for j, (x, y) in enumerate(self.coords[start:stop]):
            out[j] = self.preprocess.to_array(read_tile(slide, self.path, int(x), int(y), self.plan))
        return batch

    def close(self) -> None:
        with self._lock:
            for slide in self._handles:
                slide.close()
            self._handles.clear()
        self._local = threading.local()


def read_batches(tiles: SlideTiles, batch_size: int, threads: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first tile index, batch)`` in tile order.

    ``threads`` = 0 reads each batch in the calling thread when it is asked for; otherwise
    ``threads`` reading threads keep up to ``2 * threads`` batches read ahead.
    """
    starts = range(0, len(tiles), batch_size)
    if threads == 0:
        for start in starts:
            yield start, tiles.read_batch(start, min(start + batch_size, len(tiles)))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="tile-reader") as pool:
        pending: deque[tuple[int, Future[torch.Tensor]]] = deque()
        upcoming = iter(starts)

        def read_ahead() -> None:
            start = next(upcoming, None)
            if start is not None:
                pending.append((start, pool.submit(tiles.read_batch, start, min(start + batch_size, len(tiles)))))

        for _ in range(2 * threads):
            read_ahead()
        try:
            while pending:
                start, batch = pending.popleft()
                read_ahead()
                yield start, batch.result()
        finally:  # the consumer stopped early (e.g. an encoder error): read no further batches
            for _, batch in pending:
                batch.cancel()
