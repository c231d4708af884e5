"""Tile grid geometry at awkward sizes: full coverage, inward edge tiles, owned regions that partition."""

from __future__ import annotations

import numpy as np
import pytest

from densevision.errors import ConfigError
from densevision.tiling.grid import TileGrid, axis_starts


@pytest.mark.parametrize(
    "length,tile,stride,expected",
    [
        (1024, 512, 512, [0, 512]),
        (1000, 512, 384, [0, 384, 488]),  # last one shifted inward
        (512, 512, 256, [0]),
        (100, 512, 256, [0]),  # smaller than a tile: one padded tile
        (513, 512, 512, [0, 1]),
    ],
)
def test_axis_starts(length, tile, stride, expected):
    assert axis_starts(length, tile, stride) == expected


@pytest.mark.parametrize(
    "w,h,tile,overlap",
    [(1, 1, 32, 0), (511, 137, 64, 16), (1000, 777, 256, 64), (4096, 300, 512, 0), (97, 1200, 96, 95)],
)
def test_windows_cover_and_owned_regions_partition(w, h, tile, overlap):
    grid = TileGrid(w, h, tile, overlap)
    covered = np.zeros((h, w), dtype=np.int32)
    owned = np.zeros((h, w), dtype=np.int32)
    for t in grid:
        assert t.width == t.height == tile
        if w >= tile:
            assert 0 <= t.x <= w - tile  # inward, never padded
        else:
            assert t.x == 0
        covered[max(t.y, 0) : t.y + tile, max(t.x, 0) : t.x + tile] += 1
        x0, y0, x1, y1 = t.owned
        assert t.x <= x0 < x1 <= t.x + tile and t.y <= y0 < y1 <= t.y + tile
        owned[y0:y1, x0:x1] += 1
    assert (covered >= 1).all()
    assert (owned == 1).all()
    assert len(grid) == len(list(grid)) == grid.shape[0] * grid.shape[1]


def test_owned_region_keeps_the_halo_out():
    grid = TileGrid(1000, 1000, 256, overlap=64)
    for t in grid:
        x0, _, x1, _ = t.owned
        # Interior edges sit at least overlap/2 inside the window: the discarded halo.
        if x0 > 0:
            assert x0 - t.x >= 32
        if x1 < 1000:
            assert t.x + 256 - x1 >= 32


def test_bad_grids_are_refused_with_a_fix():
    with pytest.raises(ConfigError, match="multiple of the model's size divisor 32; try --tile 512"):
        TileGrid(100, 100, 500, divisor=32)
    with pytest.raises(ConfigError, match="overlap"):
        TileGrid(100, 100, 64, overlap=64)
    with pytest.raises(ConfigError, match="image size"):
        TileGrid(0, 100, 64)
