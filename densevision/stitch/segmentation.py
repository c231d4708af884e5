"""Stitching per-tile segmentation logits into whole-width rows of the image, band by band, in bounded memory.

Bands: with the grid's tile-row starts ``ys`` and image height ``H``, band ``k`` is the rows ``[ys[k], ys[k+1])``
(the last one ``[ys[-1], H)``): the rows whose last contributing tile row is ``k``. The bands partition
``[0, H)``; band ``k`` is final once tile rows ``0..k`` are all in (added or skipped), so bands are emitted top to
bottom as the stream advances. A band's float32 buffers (``C x h x W`` sums of ``w * logits`` and ``h x W`` sums of
``w``) exist only from the first tile that touches it until it is emitted. Fed row by row, at most
``tile + stride - 1`` rows are held; tiles that arrive out of order hold the rows between the oldest incomplete
tile row and the newest tile seen.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

import numpy as np
from numpy.typing import DTypeLike

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.blend import check_blend, tile_window
from densevision.tiling.grid import Tile, TileGrid

# sink(y0, logits, valid): rows [y0, y0 + h) of the whole width, in order. logits: C x h x W float32, the blended
# logits (NaN where no tile had weight); valid: h x W bool, False there. The stitcher keeps no reference to them.
RowSink = Callable[[int, np.ndarray, np.ndarray], None]


class SegmentationStitcher:
    """Accumulates ``C x T x T`` tile logits over ``grid`` with blend weights and hands finished rows to ``sink``.

    Feed every tile of the grid exactly once, in any order, with :meth:`add` (its prediction) or :meth:`skip` (no
    prediction: its area gets weight 0). Then :meth:`finish` checks nothing is missing. The sink is called with
    contiguous, increasing row ranges that cover ``[0, grid.height)`` exactly once (see :data:`RowSink`).

    Example::

        stitcher = SegmentationStitcher(grid, 19, "gaussian", ClassMapSink(writer))
        for tile, logits, valid in predictions:  # logits C x T x T, valid T x T
            stitcher.add(tile, logits, valid)
        stitcher.finish()
    """

    def __init__(self, grid: TileGrid, num_classes: int, blend: str, sink: RowSink) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.grid = grid
        self.num_classes = num_classes
        self.blend = check_blend(blend)
        self.sink = sink
        self._xs, self._ys = grid.xs, grid.ys
        self._edges = [*self._ys, grid.height]  # band k = rows [edges[k], edges[k + 1])
        self._left = [len(self._xs)] * len(self._ys)  # tiles not yet in, per tile row
        self._seen = np.zeros(len(grid), dtype=bool)
        self._rows_in = 0  # tile rows 0 .. _rows_in - 1 are all in
        self._next_band = 0  # first band not yet emitted
        self._bands: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._held_rows = 0
        self._max_held_rows = 0

    @property
    def held_rows(self) -> int:
        """Rows of the image whose accumulators are allocated now."""
        return self._held_rows

    @property
    def max_held_rows(self) -> int:
        """The most rows ever held at once: memory peaked at about ``(C + 1) * 4 * W`` bytes per row."""
        return self._max_held_rows

    @property
    def rows_done(self) -> int:
        """Rows ``[0, rows_done)`` have been handed to the sink."""
        return self._edges[self._next_band]

    @property
    def complete(self) -> bool:
        return self._next_band == len(self._ys)

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
        x0, y0, x1, y1 = tile.owned if self.blend == "crop" else (tile.x, tile.y, tile.x + t, tile.y + t)
        x1, y1 = min(x1, self.grid.width), min(y1, self.grid.height)
        ws = w[y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
        ls = logits[:, y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
        keep = ws > 0
        if not (np.isfinite(ls).all(axis=0) | ~keep).all():
            raise InvalidRegionError(
                f"tile #{tile.index} (row {tile.row}, col {tile.col}): non-finite logits where the tile is valid; "
                "check the model and its input (e.g. float16 overflow), or mark those pixels invalid"
            )
        contrib = np.where(keep, ls * ws, 0)  # NaN / garbage under weight 0 (padding) must not leak
        self._seen[tile.index] = True
        k = bisect.bisect_right(self._edges, y0) - 1
        while k < len(self._ys) and self._edges[k] < y1:
            b0, b1 = self._edges[k], self._edges[k + 1]
            lo, hi = max(y0, b0), min(y1, b1)
            acc, wsum = self._band(k)
            acc[:, lo - b0 : hi - b0, x0:x1] += contrib[:, lo - y0 : hi - y0]
            wsum[lo - b0 : hi - b0, x0:x1] += ws[lo - y0 : hi - y0]
            k += 1
        self._tile_in(tile)

    def skip(self, tile: Tile) -> None:
        """Record that ``tile`` has no prediction (e.g. no tissue): its area gets weight 0."""
        self._check_tile(tile)
        self._seen[tile.index] = True
        self._tile_in(tile)

    def finish(self) -> None:
        """Check that every tile was added or skipped (so every row reached the sink)."""
        if not self.complete:
            missing = np.flatnonzero(~self._seen)
            first = missing[0] if missing.size else -1
            raise InvalidRegionError(
                f"{missing.size} of {len(self._seen)} tiles were neither added nor skipped (the first is tile "
                f"#{first}); only rows [0, {self.rows_done}) of {self.grid.height} were written. "
                "Add or skip every tile of the grid"
            )

    def _check_tile(self, tile: Tile) -> None:
        rows, cols = len(self._ys), len(self._xs)
        if not (
            0 <= tile.row < rows
            and 0 <= tile.col < cols
            and tile.index == tile.row * cols + tile.col
            and (tile.x, tile.y) == (self._xs[tile.col], self._ys[tile.row])
            and tile.width == tile.height == self.grid.tile
        ):
            raise InvalidRegionError(
                f"tile #{tile.index} at ({tile.x}, {tile.y}) is not a tile of this {self.grid.width} x "
                f"{self.grid.height} grid (tile {self.grid.tile}, overlap {self.grid.overlap}); "
                "pass the tiles of the grid given to the stitcher"
            )
        if self._seen[tile.index]:
            raise InvalidRegionError(
                f"tile #{tile.index} (row {tile.row}, col {tile.col}) was already added or skipped; "
                "feed each tile once (a resumed run must start a new stitcher)"
            )

    def _band(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Band ``k``'s accumulators, allocated at its first contribution."""
        if k not in self._bands:
            h, w = self._edges[k + 1] - self._edges[k], self.grid.width
            self._bands[k] = (
                np.zeros((self.num_classes, h, w), dtype=np.float32),
                np.zeros((h, w), dtype=np.float32),
            )
            self._held_rows += h
            self._max_held_rows = max(self._max_held_rows, self._held_rows)
        return self._bands[k]

    def _tile_in(self, tile: Tile) -> None:
        """Count ``tile`` in its row, then emit every band that is now final, in order."""
        self._left[tile.row] -= 1
        while self._rows_in < len(self._ys) and self._left[self._rows_in] == 0:
            self._rows_in += 1
        while self._next_band < self._rows_in:
            self._emit(self._next_band)
            self._next_band += 1

    def _emit(self, k: int) -> None:
        y0, h = self._edges[k], self._edges[k + 1] - self._edges[k]
        band = self._bands.pop(k, None)
        if band is None:  # no tile contributed: all nodata
            logits = np.full((self.num_classes, h, self.grid.width), np.nan, dtype=np.float32)
            valid = np.zeros((h, self.grid.width), dtype=bool)
        else:
            self._held_rows -= h
            logits, wsum = band
            valid = wsum > 0
            np.divide(logits, wsum, out=logits, where=valid)
            logits[:, ~valid] = np.nan
        self.sink(y0, logits, valid)


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


class WindowWriter(Protocol):
    """What :class:`ClassMapSink` writes to: ``GeoTiffWriter`` and ``PyramidTiffWriter`` (``H x W [x C]``)."""

    def write(self, array: np.ndarray, x: int, y: int) -> None: ...


class ClassMapSink:
    """A :data:`RowSink` writing each finished band as a class map and/or per-class probabilities.

    ``classes`` gets ``h x W`` indices (see :func:`class_map`; create the writer with the same dtype and
    ``nodata``); ``probs`` gets ``h x W x C`` float32 (see :func:`probabilities`; e.g. a ``GeoTiffWriter`` with
    ``count=C, dtype=float32, nodata=nan``). Both receive whole-width bands top to bottom at ``x = 0``, as the
    pyramid writer requires.
    """

    def __init__(
        self,
        classes: WindowWriter | None,
        probs: WindowWriter | None = None,
        *,
        nodata: int = 255,
        dtype: DTypeLike = np.uint8,
    ) -> None:
        if classes is None and probs is None:
            raise ConfigError("ClassMapSink needs a class-map writer, a probability writer, or both")
        self.classes, self.probs, self.nodata, self.dtype = classes, probs, nodata, dtype

    def __call__(self, y0: int, logits: np.ndarray, valid: np.ndarray) -> None:
        if self.classes is not None:
            self.classes.write(class_map(logits, valid, self.nodata, self.dtype), 0, y0)
        if self.probs is not None:
            self.probs.write(np.moveaxis(probabilities(logits, valid), 0, -1), 0, y0)
