"""The pyramid of an image written window by window: its levels' sizes, the 2 x 2 halving, and the chain that
assembles each level's tiles as the windows come and halves every complete tile into the level below. No file
format here: :class:`~densevision.io.writers.PyramidTiffWriter` encodes every level's tiles into its TIFF, and
:class:`~densevision.io.writers.GeoTiffWriter` writes the levels below level 0 as a COG's overviews.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np

from densevision.errors import InvalidRegionError

Downsampling = Literal["mode", "nearest", "mean"]


def pyramid_dimensions(width: int, height: int, tile_size: int) -> list[tuple[int, int]]:
    """Level sizes ``(w, h)``: level 0, then ``ceil(w / 2), ceil(h / 2)`` per level until one fits in a tile."""
    dims = [(width, height)]
    while dims[-1][0] > tile_size or dims[-1][1] > tile_size:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def halve(a: np.ndarray, how: Downsampling) -> np.ndarray:
    """Halve an ``H x W x C`` uint8 array to ``ceil(H / 2) x ceil(W / 2) x C``; odd edges repeat their last
    row / column.

    ``mode``: the most frequent of each 2 x 2 block (ties: the earliest in top-left, top-right, bottom-left,
    bottom-right order), so class maps keep only existing classes. ``nearest``: the top-left pixel. ``mean``: the
    rounded mean (for RGB).
    """
    if how == "nearest":
        return a[::2, ::2]
    h, w = a.shape[:2]
    a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    q = np.stack([a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2]])  # 4 x H/2 x W/2 x C
    if how == "mean":
        return ((q.sum(axis=0, dtype=np.uint16) + 2) // 4).astype(a.dtype)
    # The first pixel wins when it equals another (no other value then has more votes); else the second when it
    # equals a later one; else the third when it equals the fourth; else all differ and the first wins the tie.
    # 2.2x faster than counting each pixel's votes (4096^2 class map: 0.13 s against 0.29 s).
    p, r, s, t = q
    later = np.where((r == s) | (r == t), r, np.where(s == t, s, p))
    return np.where((p == r) | (p == s) | (p == t), p, later)


class TileLevel:
    """One pyramid level fed by windows in any order: each ``tile_size``-square tile is held from its first pixel
    until its last, then handed on.

    Memory: the tiles touched and not yet complete, ``tile_size ** 2 * samples`` bytes each (padding included).
    """

    def __init__(self, width: int, height: int, samples: int, tile_size: int, fill: int = 0) -> None:
        self.width, self.height, self.samples, self.tile_size, self.fill = width, height, samples, tile_size, fill
        self.cols, self.rows = -(-width // tile_size), -(-height // tile_size)
        self.done = np.zeros(self.rows * self.cols, dtype=bool)
        self.pixels = 0  # pixels received
        self._partial: dict[int, tuple[np.ndarray, list[int]]] = {}  # index -> (tile, [pixels still missing])

    @property
    def complete(self) -> bool:
        return self.pixels == self.width * self.height

    @property
    def held_tiles(self) -> int:
        return len(self._partial)

    def extent(self, tx: int, ty: int) -> tuple[int, int]:
        """Rows and columns of tile ``(tx, ty)`` inside the level (fewer than ``tile_size`` at its edges)."""
        t = self.tile_size
        return min(t, self.height - ty * t), min(t, self.width - tx * t)

    def put(self, a: np.ndarray, x: int, y: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Add ``a`` (``h x w x samples``, inside the level) at ``(x, y)``; yield ``(tx, ty, tile)`` for each tile
        it completes: its column, row and ``tile_size x tile_size x samples`` pixels, padded with ``fill`` past the
        level's edge."""
        t = self.tile_size
        h, w = a.shape[:2]
        for ty in range(y // t, -(-(y + h) // t)):
            for tx in range(x // t, -(-(x + w) // t)):
                i = ty * self.cols + tx
                y0, y1 = max(y, ty * t), min(y + h, (ty + 1) * t)
                x0, x1 = max(x, tx * t), min(x + w, (tx + 1) * t)
                entry = self._partial.get(i)
                if entry is None:
                    if self.done[i]:
                        raise InvalidRegionError(
                            f"pixels ({x0}, {y0})..({x1}, {y1}) of tile ({tx}, {ty}) came twice: that tile was "
                            "complete already; write every pixel exactly once"
                        )
                    tile = np.full((t, t, self.samples), self.fill, dtype=np.uint8)
                    entry = self._partial[i] = (tile, [math.prod(self.extent(tx, ty))])
                tile, left = entry
                tile[y0 - ty * t : y1 - ty * t, x0 - tx * t : x1 - tx * t] = a[y0 - y : y1 - y, x0 - x : x1 - x]
                left[0] -= (y1 - y0) * (x1 - x0)
                self.pixels += (y1 - y0) * (x1 - x0)
                if left[0] < 0:
                    raise InvalidRegionError(
                        f"tile ({tx}, {ty}) got more pixels than it has: some came twice; write every pixel "
                        "exactly once"
                    )
                if left[0] == 0:
                    del self._partial[i]
                    self.done[i] = True
                    yield tx, ty, tile


class Pyramid:
    """Every level of a ``width x height x samples`` uint8 image (:func:`pyramid_dimensions`), built as level 0's
    windows come in any order: each complete tile is handed to ``sink(level, tx, ty, tile)`` (padded with ``fill``
    past the level's edge, see :meth:`TileLevel.put`), then halved (:func:`halve`, ``how``) into the level below.
    Tiles start at multiples of ``tile_size``, which is even, so halving tile by tile equals halving the whole
    level. The levels do not depend on the order of the windows.

    Memory: the tiles started and not yet complete on every level (see :class:`TileLevel`)."""

    def __init__(
        self,
        width: int,
        height: int,
        samples: int,
        tile_size: int,
        how: Downsampling,
        sink: Callable[[int, int, int, np.ndarray], None],
        fill: int = 0,
    ) -> None:
        self.tile_size, self.how, self.sink = tile_size, how, sink
        self.dimensions = pyramid_dimensions(width, height, tile_size)
        self.levels = [TileLevel(w, h, samples, tile_size, fill) for w, h in self.dimensions]

    @property
    def held_tiles(self) -> int:
        """Tiles started and not yet complete, all levels together (``tile_size ** 2 * samples`` bytes each)."""
        return sum(lv.held_tiles for lv in self.levels)

    @property
    def complete(self) -> bool:
        return all(lv.complete for lv in self.levels)

    def put(self, a: np.ndarray, x: int, y: int, level: int = 0) -> None:
        """Add ``a`` (``h x w x samples``, inside the level) at ``(x, y)`` of ``level``."""
        lv, half = self.levels[level], self.tile_size // 2
        for tx, ty, tile in lv.put(a, x, y):
            self.sink(level, tx, ty, tile)
            if level + 1 < len(self.levels):
                h, w = lv.extent(tx, ty)
                self.put(halve(tile[:h, :w], self.how), tx * half, ty * half, level + 1)
