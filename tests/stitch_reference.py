"""The numpy segmentation stitcher that densevision shipped before blending moved to the model's device (commit
dea5ff2, ``densevision/stitch/segmentation.py``), kept as the reference of the device stitcher: the same cells, the same
float32 sums in feed order (``acc += logits * w``), division by the weight sum, ``argmax`` (first maximum), softmax
in numpy. Its sink gets ``C x h x w`` float32 logits, NaN where no tile had weight. Not used by the library."""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Callable, Iterator

import numpy as np
from numpy.typing import DTypeLike

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.blend import check_blend, tile_window
from densevision.tiling.grid import Tile, TileGrid, axis_bounds

BlockSink = Callable[[int, int, np.ndarray, np.ndarray], None]


def _cuts(starts: list[int], bounds: list[tuple[int, int]], tile: int, length: int, crop: bool) -> list[int]:
    """Sorted cell bounds along one axis: every edge of every tile's reach, with 0 and ``length``."""
    edges = {e for b in bounds for e in b} if crop else {e for s in starts for e in (s, min(s + tile, length))}
    return sorted(edges | {0, length})


def _mapped_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros in their own anonymous memory map, unmapped when the array is freed."""
    n = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=np.float32, count=n // 4).reshape(shape)


class SegmentationStitcher:
    """Accumulates ``C x T x T`` tile logits over ``grid`` with blend weights and hands final cells to ``sink``.

    Feed every tile of the grid exactly once, in any order, with :meth:`add` (its prediction) or :meth:`skip` (no
    prediction: its area gets weight 0). Then :meth:`finish` checks nothing is missing. The sink gets every cell
    once, when it is final (see the module docstring and :data:`BlockSink`): one call per cell, not merged, in the
    order (row, column) of the cells that the current ``add`` / ``skip`` completes.

    Example::

        sink = ClassMapSink(grid, writer)  # cells -> class map -> writer windows
        stitcher = SegmentationStitcher(grid, 19, "gaussian", sink)
        for tile, logits, valid in predictions:  # in stitch_order(grid); logits C x T x T, valid T x T
            stitcher.add(tile, logits, valid)
        stitcher.finish()
        sink.finish()
    """

    def __init__(self, grid: TileGrid, num_classes: int, blend: str, sink: BlockSink) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.grid = grid
        self.num_classes = num_classes
        self.blend = check_blend(blend)
        self.sink = sink
        t, crop = grid.tile, self.blend == "crop"
        self._xs, self._ys = grid.xs, grid.ys
        xb, yb = axis_bounds(self._xs, t, grid.width), axis_bounds(self._ys, t, grid.height)
        self._col_cuts = _cuts(self._xs, xb, t, grid.width, crop)
        self._row_cuts = _cuts(self._ys, yb, t, grid.height, crop)
        # The part of the image each tile row / column reaches (crop: its owned span), and the cells that covers.
        self._row_reach = yb if crop else [(y, min(y + t, grid.height)) for y in self._ys]
        self._col_reach = xb if crop else [(x, min(x + t, grid.width)) for x in self._xs]
        self._row_cells = [(self._row_cuts.index(a), self._row_cuts.index(b)) for a, b in self._row_reach]
        self._col_cells = [(self._col_cuts.index(a), self._col_cuts.index(b)) for a, b in self._col_reach]
        # Contributors not yet in, per cell: the grid is a product, so the count is too.
        per_row = np.zeros(len(self._row_cuts) - 1, dtype=np.int32)
        for a, b in self._row_cells:
            per_row[a:b] += 1
        per_col = np.zeros(len(self._col_cuts) - 1, dtype=np.int32)
        for a, b in self._col_cells:
            per_col[a:b] += 1
        self._left = np.outer(per_row, per_col).astype(np.int32)
        self._unsent = [len(per_col)] * len(per_row)  # cells not yet emitted, per row of cells
        self._rows_sent = 0  # rows of cells 0 .. _rows_sent - 1 are all emitted
        self._seen = np.zeros(len(grid), dtype=bool)
        self._cells: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._held = 0
        self._max_held = 0

    @property
    def held_pixels(self) -> int:
        """Image pixels whose accumulators are allocated now (``(C + 1) * 4`` bytes each)."""
        return self._held

    @property
    def max_held_pixels(self) -> int:
        """The most pixels ever held at once: the accumulators peaked at ``max_held_pixels * (C + 1) * 4`` bytes."""
        return self._max_held

    @property
    def rows_done(self) -> int:
        """Rows ``[0, rows_done)`` have been handed to the sink in full (other rows may be in part)."""
        return self._row_cuts[self._rows_sent]

    @property
    def complete(self) -> bool:
        return self._rows_sent == len(self._unsent)

    def add(self, tile: Tile, logits: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add ``tile``'s prediction.

        Args:
            logits: ``C x T x T`` (converted to float32; a CPU torch tensor works through ``__array__``).
            valid: ``T x T`` bool, False for padding / nodata / outside the image (weight 0); None: all valid.
        """
        self._check_tile(tile)
        t, c = self.grid.tile, self.num_classes
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (c, t, t):
            raise InvalidRegionError(
                f"tile #{tile.index}: expected logits of shape C x T x T = {(c, t, t)}, got {logits.shape}; "
                "pass one tile's prediction at tile size (crop the batch padding, keep all classes)"
            )
        w = tile_window(self.blend, tile)
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != (t, t):
                raise InvalidRegionError(f"tile #{tile.index}: expected a {t} x {t} valid mask, got {valid.shape}")
            w = w * valid
        # The part of the image this tile can contribute to (crop: only its owned region).
        (y0, y1), (x0, x1) = self._row_reach[tile.row], self._col_reach[tile.col]
        ws = w[y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
        ls = logits[:, y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
        contrib = ls * ws
        # One sum tells that every product is finite (the common case) far cheaper than a per-pixel check.
        if not np.isfinite(contrib.sum(dtype=np.float64)):
            keep = ws > 0
            if not (np.isfinite(ls).all(axis=0) | ~keep).all():
                raise InvalidRegionError(
                    f"tile #{tile.index} (row {tile.row}, col {tile.col}): non-finite logits where the tile is valid; "
                    "check the model and its input (e.g. float16 overflow), or mark those pixels invalid"
                )
            contrib = np.where(keep, contrib, 0)  # NaN / garbage under weight 0 (padding) must not leak
        self._seen[tile.index] = True
        rc, cc = self._row_cuts, self._col_cuts
        for i, j in self._cells_of(tile):
            a, b, p, q = rc[i] - y0, rc[i + 1] - y0, cc[j] - x0, cc[j + 1] - x0
            acc, wsum = self._cell(i, j)
            acc += contrib[:, a:b, p:q]
            wsum += ws[a:b, p:q]
            self._contributed(i, j)

    def skip(self, tile: Tile) -> None:
        """Record that ``tile`` has no prediction (e.g. no tissue): its area gets weight 0."""
        self._check_tile(tile)
        self._seen[tile.index] = True
        for i, j in self._cells_of(tile):
            self._contributed(i, j)

    def finish(self) -> None:
        """Check that every tile was added or skipped (so every pixel reached the sink)."""
        if not self.complete:
            missing = np.flatnonzero(~self._seen)
            first = missing[0] if missing.size else -1
            raise InvalidRegionError(
                f"{missing.size} of {len(self._seen)} tiles were neither added nor skipped (the first is tile "
                f"#{first}); only rows [0, {self.rows_done}) of {self.grid.height} were written in full. "
                "Add or skip every tile of the grid"
            )

    def _check_tile(self, tile: Tile) -> None:
        self.grid.require(tile, "the stitcher")
        if self._seen[tile.index]:
            raise InvalidRegionError(
                f"tile #{tile.index} (row {tile.row}, col {tile.col}) was already added or skipped; "
                "feed each tile once (a resumed run must start a new stitcher)"
            )

    def _cells_of(self, tile: Tile) -> Iterator[tuple[int, int]]:
        """The cells ``(i, j)`` ``tile`` covers, row by row."""
        return itertools.product(range(*self._row_cells[tile.row]), range(*self._col_cells[tile.col]))

    def _cell(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``(i, j)``'s accumulators, allocated at its first contribution."""
        cell = self._cells.get((i, j))
        if cell is None:
            h, w = self._row_cuts[i + 1] - self._row_cuts[i], self._col_cuts[j + 1] - self._col_cuts[j]
            cell = self._cells[i, j] = (
                _mapped_zeros((self.num_classes, h, w)),
                _mapped_zeros((h, w)),
            )
            self._held += h * w
            self._max_held = max(self._max_held, self._held)
        return cell

    def _contributed(self, i: int, j: int) -> None:
        """One more contributor of cell ``(i, j)`` is in: emit the cell if it was the last."""
        self._left[i, j] -= 1
        if self._left[i, j]:
            return
        y0, x0 = self._row_cuts[i], self._col_cuts[j]
        h, w = self._row_cuts[i + 1] - y0, self._col_cuts[j + 1] - x0
        cell = self._cells.pop((i, j), None)
        if cell is None:  # every contributor was skipped: all nodata
            logits = np.full((self.num_classes, h, w), np.nan, dtype=np.float32)
            valid = np.zeros((h, w), dtype=bool)
        else:
            self._held -= h * w
            logits, wsum = cell
            valid = wsum > 0
            np.divide(logits, wsum, out=logits, where=valid)
            logits[:, ~valid] = np.nan
        self._unsent[i] -= 1
        while self._rows_sent < len(self._unsent) and self._unsent[self._rows_sent] == 0:
            self._rows_sent += 1
        self.sink(y0, x0, logits, valid)


def class_map(logits: np.ndarray, valid: np.ndarray, nodata: int = 255, dtype: DTypeLike = np.uint8) -> np.ndarray:
    """``h x W`` class indices of ``C x h x W`` logits: ``argmax`` over classes, or ``logit > 0`` when ``C == 1``
    (a sigmoid head); ``nodata`` where ``valid`` (``h x W`` bool) is False."""
    dtype = np.dtype(dtype)
    c = logits.shape[0]
    info = np.iinfo(dtype)
    if not (max(c, 2) <= nodata <= info.max):
        raise ConfigError(
            f"nodata {nodata} must not be a class index (0..{max(c, 2) - 1}) and must fit {dtype} "
            f"(<= {info.max}); use nodata={info.max} or a wider dtype"
        )
    x = np.where(valid, logits, 0)  # argmax would pick NaN
    classes = (x[0] > 0) if c == 1 else x.argmax(axis=0)
    return np.where(valid, classes, nodata).astype(dtype)


def probabilities(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``C x h x W`` float32 softmax over classes (sigmoid when ``C == 1``), NaN where ``valid`` is False.

    Probabilities of the blended logits (blending logits, then softmax, as mmsegmentation's slide inference)."""
    x = np.where(valid, logits, 0).astype(np.float32)
    if x.shape[0] == 1:
        p = 1 / (1 + np.exp(-x))
    else:
        p = np.exp(x - x.max(axis=0, keepdims=True))
        p /= p.sum(axis=0, keepdims=True)
    p[:, ~valid] = np.nan
    return p
