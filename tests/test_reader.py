"""Reading threads: batches in tile order, the same pixels at any thread count, errors named, handles closed."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import torch

from encoders import reader as reader_module
from encoders.extract import encode_tiles
from encoders.models import create_encoder
from encoders.reader import SlideTiles, read_batches
from encoders.slides import SlideError, open_slide
from encoders.tiling import grid_coords, plan_tiles, read_tile


@pytest.fixture
def tiles(make_slide):
    slide = make_slide("s", size=(1024, 768), mpp=0.5)
    with open_slide(slide.path) as handle:
        plan = plan_tiles(0.5, 1.0, 32, handle.level_downsamples)
        size = handle.dimensions
    coords = grid_coords(*size, plan.tile_size_level0)[:37]  # 37: the last batch is short
    preprocess = create_encoder("random-vit-tiny", "random").transform
    return SlideTiles(slide.path, coords, plan, preprocess)


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_batches_come_in_tile_order_with_the_pixels_of_each_tile(tiles, threads):
    with open_slide(tiles.path) as handle:
        expected = np.stack([tiles.preprocess.to_array(read_tile(handle, tiles.path, int(x), int(y), tiles.plan))
                             for x, y in tiles.coords])
    batches = list(read_batches(tiles, 8, threads))
    tiles.close()
    assert [start for start, _ in batches] == list(range(0, 37, 8))
    assert [len(b) for _, b in batches] == [8, 8, 8, 8, 5]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (224, 224, 3) for _, b in batches)
    assert np.array_equal(torch.cat([b for _, b in batches]).numpy(), expected)
    # the encoder's input: a [n, 3, H, W] view, made contiguous once by `normalize`
    x = tiles.preprocess.normalize(batches[0][1].permute(0, 3, 1, 2))
    assert x.is_contiguous() and x.shape == (8, 3, 224, 224)
    assert torch.equal(x, tiles.preprocess.normalize(torch.from_numpy(expected[:8]).permute(0, 3, 1, 2).contiguous()))


def test_a_failing_tile_stops_the_reading_with_the_slide_named(tiles, monkeypatch):
    real = reader_module.read_tile

    def failing(slide, path, x, y, plan):
        if (x, y) == tuple(int(v) for v in tiles.coords[20]):
            raise SlideError(f"{path}: cannot read pixels at level-0 ({x}, {y})")
        return real(slide, path, x, y, plan)

    monkeypatch.setattr(reader_module, "read_tile", failing)
    seen = []
    with pytest.raises(SlideError, match=str(tiles.path.name)):
        for start, _ in read_batches(tiles, 8, threads=2):
            seen.append(start)
    assert seen == [0, 8]  # the batches before the failing one arrive; nothing after it
    tiles.close()


def test_every_reading_thread_opens_its_own_handle_and_close_closes_them(tiles, monkeypatch):
    opened: list[tuple[int, object]] = []

    def recording_open(path):
        handle = open_slide(path)
        opened.append((threading.get_ident(), handle))
        return handle

    monkeypatch.setattr(reader_module, "open_slide", recording_open)
    list(read_batches(tiles, 4, threads=3))
    assert len(opened) == len({thread for thread, _ in opened}) >= 2  # one handle per thread that read
    tiles.close()
    for _, handle in opened:
        with pytest.raises(ctypes.ArgumentError):  # what a closed OpenSlide handle raises on use
            handle.dimensions  # noqa: B018


def test_an_encoder_error_stops_every_reader_before_the_slide_is_closed(tiles):
    class FailingEncoder:
        embed_dim = 4
        calls = 0

        def encode_uint8(self, images):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CUDA out of memory")
            return torch.zeros(len(images), 4)

    with pytest.raises(RuntimeError, match="out of memory"):
        encode_tiles(tiles, FailingEncoder(), 4, readers=3, desc="s")
    assert not [t for t in threading.enumerate() if t.name.startswith("tile-reader")]
    tiles.close()
