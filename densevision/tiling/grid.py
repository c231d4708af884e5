"""The tile grid: where windows are read and which part of the output each one owns.

All coordinates are pixels of the working level. Along one axis of length ``L`` with tile ``T`` and stride
``S = T - overlap``, the starts are::

    n   = 1 if L <= T else ceil((L - T) / S) + 1
    p_i = min(i * S, L - T)          (the last tile is shifted inward, never padded)

An image shorter than a tile gets one tile at 0 that reaches past the edge (the reader marks that part invalid).
Consecutive tiles split their overlap at its middle, ``b_i = (p_{i+1} + p_i + T) // 2``, so tile ``i`` owns
``[b_{i-1}, b_i)`` (``b_{-1} = 0``, ``b_{n-1} = L``): the ``crop`` blend keeps exactly that part.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from densevision.errors import ConfigError, InvalidRegionError


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis (see the module docstring)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(n)]


def axis_bounds(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` span each tile owns: neighbours split their overlap at its middle."""
    cuts = [(a + b + tile) // 2 for a, b in itertools.pairwise(starts)]
    return list(zip([0, *cuts], [*cuts, length], strict=True))


@dataclass(frozen=True)
class Tile:
    """One window of the grid. ``x, y, size, size`` is what is read; ``owned`` is ``(x0, y0, x1, y1)``, the part
    of the output this tile alone covers under the ``crop`` blend. ``row, col`` index the grid."""

    index: int
    row: int
    col: int
    x: int
    y: int
    width: int
    height: int
    owned: tuple[int, int, int, int]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile x tile`` pixels with ``overlap`` shared pixels between neighbours over a ``width x height``
    image. ``divisor`` is the model's size divisibility (e.g. 32 for a Swin/FPN): the tile must be a multiple."""

    width: int
    height: int
    tile: int
    overlap: int = 0
    divisor: int = 1

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"image size must be positive, got {self.width} x {self.height}")
        if self.tile < 1 or self.tile % self.divisor:
            raise ConfigError(
                f"tile size {self.tile} must be a positive multiple of the model's size divisor {self.divisor}; "
                f"try --tile {max(self.divisor, round(self.tile / self.divisor) * self.divisor)}"
            )
        if not 0 <= self.overlap < self.tile:
            raise ConfigError(f"overlap {self.overlap} must be >= 0 and smaller than the tile size {self.tile}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @functools.cached_property
    def xs(self) -> list[int]:
        return axis_starts(self.width, self.tile, self.stride)

    @functools.cached_property
    def ys(self) -> list[int]:
        return axis_starts(self.height, self.tile, self.stride)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of tiles."""
        return len(self.ys), len(self.xs)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def require(self, tile: Tile, user: str) -> None:
        """Raise InvalidRegionError unless ``tile`` is one of this grid's tiles (``user`` names who was fed it)."""
        xs, ys = self.xs, self.ys
        if not (
            0 <= tile.row < len(ys)
            and 0 <= tile.col < len(xs)
            and tile.index == tile.row * len(xs) + tile.col
            and (tile.x, tile.y) == (xs[tile.col], ys[tile.row])
            and tile.width == tile.height == self.tile
        ):
            raise InvalidRegionError(
                f"tile #{tile.index} at ({tile.x}, {tile.y}) is not a tile of this {self.width} x {self.height} "
                f"grid (tile {self.tile}, overlap {self.overlap}); pass the tiles of the grid given to {user}"
            )

    def __iter__(self) -> Iterator[Tile]:
        """Tiles in row-major order (a band of tiles is one row)."""
        xs, ys = self.xs, self.ys
        xb = axis_bounds(xs, self.tile, self.width)
        yb = axis_bounds(ys, self.tile, self.height)
        for r, (y, (y0, y1)) in enumerate(zip(ys, yb, strict=True)):
            for c, (x, (x0, x1)) in enumerate(zip(xs, xb, strict=True)):
                yield Tile(r * len(xs) + c, r, c, x, y, self.tile, self.tile, (x0, y0, x1, y1))
