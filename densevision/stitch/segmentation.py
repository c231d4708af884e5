"""Stitching per-tile segmentation logits into blocks of the image that are handed on as soon as they are final.

Cells: the image is cut at every edge of every tile's reach: the tile's ``T x T`` window (clipped to the image), or
under the ``crop`` blend its ``owned`` region. Cutting rows at each ``ys[r]`` and ``ys[r] + T`` (``crop``: at the
owned bounds) and columns likewise gives a grid of cells; every tile covers whole cells, so each cell has a fixed
set of contributing tiles (under ``crop`` exactly one). A cell is final once all of its contributors are in (added
or skipped): it is then normalised, handed to the sink and forgotten. Its float32 accumulators (``C x h x w`` sums
of ``w * logits``, ``h x w`` sums of ``w``) exist only from its first contribution until then; a cell whose
contributors were all skipped is never allocated (it is emitted as nodata).

Memory: fed in :func:`stitch_order` (row-major, the last two tile rows column by column when the last is shifted
inward) the stitcher holds the strip of rows that the next tile row will still add to, the grid's ``overlap`` rows of
the whole width, plus a few tiles: :attr:`max_held_pixels` ``<= overlap * W + 3 * T * T``; each held pixel costs
``(C + 1) * 4`` bytes. Plain row-major order holds ``strip = max_r (ys[r] + T - ys[r + 1])`` rows instead (up to
``T - 1`` when the last tile row is shifted inward): ``<= strip * W + T * T``. Batches of ``b`` tiles shuffled
within themselves add up to ``b`` tiles. The ``crop`` blend holds one owned region at most (each cell is final at
its tile's add). Any other order is correct too but holds every cell touched and not yet final.

Per pixel, contributions are summed in float32 in the order the tiles were fed, as a whole-image accumulator would:
the same inputs in the same order give bit-identical blocks.

Downstream: writers take the cells as windows (:class:`ClassMapSink`); :class:`BlockAssembler` regroups them into
fixed blocks (e.g. the grid's, :func:`block_edges`, for the work folder of a resumable run).
"""

from __future__ import annotations

import bisect
import itertools
import mmap
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.blend import check_blend, tile_window
from densevision.tiling.grid import Tile, TileGrid, axis_bounds

# sink(y0, x0, logits, valid): one final cell, rows [y0, y0 + h) x columns [x0, x0 + w). logits: C x h x w float32,
# the blended logits (NaN where no tile had weight); valid: h x w bool, False there. Every pixel of the image is in
# exactly one call; the stitcher keeps no reference to the arrays (the sink may keep or modify them).
BlockSink = Callable[[int, int, np.ndarray, np.ndarray], None]


def block_edges(grid: TileGrid, blend: str) -> tuple[list[int], list[int]]:
    """Row and column bounds of the grid's blocks, block ``(k, c)`` being final once the tiles up to ``(k, c)`` in
    :func:`stitch_order` are in (no later tile reaches it): rows ``[ys[k], ys[k + 1])`` x columns ``[xs[c],
    xs[c + 1])`` (the last ones up to the height / width), or under the ``crop`` blend tile ``(k, c)``'s owned
    region, so that each of the stitcher's cells lies in one block. Block row ``k`` holds the rows whose last
    contributing tile row is ``k``: final once tile rows ``0..k`` are in."""
    if check_blend(blend) == "crop":
        ys, xs = axis_bounds(grid.ys, grid.tile, grid.height), axis_bounds(grid.xs, grid.tile, grid.width)
        return [0, *(b for _, b in ys)], [0, *(b for _, b in xs)]
    return [*grid.ys, grid.height], [*grid.xs, grid.width]


def stitch_order(grid: TileGrid) -> list[Tile]:
    """The grid's tiles in the order that holds the fewest accumulators: row-major, except that a tile row overlapping
    the next by more than the grid's overlap (the last row, shifted inward) is fed together with the next, column by
    column: ``(r, 0), (r + 1, 0), (r, 1), (r + 1, 1), ...``. In row-major order that overlap (up to ``T - 1`` rows)
    would be held over the whole width until the next row arrives; column by column it is final tile by tile."""
    cols, ys, t = len(grid.xs), grid.ys, grid.tile
    tiles = list(grid)
    order: list[Tile] = []
    r = 0
    while r < len(ys):
        row = tiles[r * cols : (r + 1) * cols]
        if r + 1 < len(ys) and ys[r] + t - ys[r + 1] > grid.overlap:
            order += itertools.chain.from_iterable(zip(row, tiles[(r + 1) * cols : (r + 2) * cols], strict=True))
            r += 2
        else:
            order += row
            r += 1
    return order


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


class WindowWriter(Protocol):
    """What :class:`ClassMapSink` writes to: ``GeoTiffWriter`` and ``PyramidTiffWriter`` (``h x w [x C]`` windows
    at ``(x, y)``, in any order)."""

    def write(self, array: np.ndarray, x: int, y: int) -> None: ...


def _check_edges(edges: list[int], what: str) -> None:
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ConfigError(f"{what} edges must increase from 0 to the image's size, got {edges[:8]}")


class BlockAssembler:
    """Regroups pieces of the image (e.g. a :class:`SegmentationStitcher`'s cells, once reduced to class maps) into
    the blocks of a fixed grid, and hands each block to ``sink`` once all its pixels have come.

    Block ``(k, c)`` is rows ``[rows[k], rows[k + 1])`` x columns ``[cols[c], cols[c + 1])`` (edges increasing from 0
    to the height / width; e.g. :func:`block_edges`: the grid's rows and columns of tiles). Call the assembler with
    ``(y0, x0, *pieces)``: one or more arrays of the same ``h x w [x ...]`` pixels at rows ``[y0, y0 + h)``, columns
    ``[x0, x0 + w)``; a piece may straddle blocks. A complete block goes out as ``sink(y0, x0, *blocks)`` (one array
    per stream, the dtype of the first piece that reached it) as soon as it is complete. Every pixel must come exactly
    once.

    ``block_rows = (a, b)`` assembles only the block rows ``a .. b - 1`` (e.g. a rank's share, or what a resume still
    needs): parts of pieces outside them are dropped.

    Memory: a block's buffers exist from its first piece until it is handed on, ``block pixels x`` the bytes of one
    pixel of each stream (1 for a uint8 class map, ``4 * C`` for float32 probabilities). Fed by a stitcher in
    :func:`stitch_order`, the blocks are final about as fast as they are started: a few blocks are held, whatever
    the image size.
    """

    def __init__(
        self,
        rows: list[int],
        cols: list[int],
        sink: BlockSink | Callable[..., None],
        *,
        block_rows: tuple[int, int] | None = None,
    ) -> None:
        _check_edges(rows, "row")
        _check_edges(cols, "column")
        n = len(rows) - 1
        a, b = block_rows if block_rows is not None else (0, n)
        if not 0 <= a <= b <= n:
            raise ConfigError(f"block rows {block_rows} must be a range within the {n} block rows")
        self.rows, self.cols, self.sink = list(rows), list(cols), sink
        self.width, self.height = cols[-1], rows[-1]
        self._start, self._stop = a, b
        self._sent = np.zeros((n, len(cols) - 1), dtype=bool)
        self._bufs: dict[tuple[int, int], tuple[list[int], tuple[np.ndarray, ...]]] = {}  # [missing pixels], arrays
        self._held = 0
        self._max_held = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of block buffers allocated now."""
        return self._held

    @property
    def max_held_bytes(self) -> int:
        return self._max_held

    @property
    def complete(self) -> bool:
        """Every block asked for has been handed on."""
        return bool(self._sent[self._start : self._stop].all())

    def _block_name(self, k: int, c: int) -> str:
        return f"block ({k}, {c}) (rows {self.rows[k]}..{self.rows[k + 1]}, columns {self.cols[c]}..{self.cols[c + 1]})"

    def __call__(self, y0: int, x0: int, *pieces: Any) -> None:
        arrays = [np.asarray(b) for b in pieces]
        if not arrays or any(a.ndim < 2 or a.shape[:2] != arrays[0].shape[:2] for a in arrays):
            raise InvalidRegionError(
                f"block at ({x0}, {y0}): expected one or more h x w [x ...] arrays of the same size, got shapes "
                f"{[a.shape for a in arrays]}"
            )
        h, w = arrays[0].shape[:2]
        if not (0 <= x0 <= self.width - w and 0 <= y0 <= self.height - h):
            raise InvalidRegionError(
                f"block of {w} x {h} pixels at ({x0}, {y0}) leaves the {self.width} x {self.height} image"
            )
        ks = range(max(bisect.bisect_right(self.rows, y0) - 1, self._start), self._stop)
        cs = range(bisect.bisect_right(self.cols, x0) - 1, len(self.cols) - 1)
        for k in itertools.takewhile(lambda k: self.rows[k] < y0 + h, ks):
            r0, r1 = max(y0, self.rows[k]), min(y0 + h, self.rows[k + 1])
            if r0 >= r1:
                continue
            for c in itertools.takewhile(lambda c: self.cols[c] < x0 + w, cs):
                c0, c1 = max(x0, self.cols[c]), min(x0 + w, self.cols[c + 1])
                if c0 < c1:
                    self._put(k, c, [a[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] for a in arrays], r0, c0)

    def _put(self, k: int, c: int, parts: list[np.ndarray], y: int, x: int) -> None:
        if self._sent[k, c]:
            raise InvalidRegionError(f"{self._block_name(k, c)} was complete already: a pixel came twice")
        entry = self._bufs.get((k, c))
        by, bx = self.rows[k], self.cols[c]
        if entry is None:
            bh, bw = self.rows[k + 1] - by, self.cols[c + 1] - bx
            bufs = tuple(np.empty((bh, bw, *a.shape[2:]), dtype=a.dtype) for a in parts)
            entry = self._bufs[k, c] = ([bh * bw], bufs)
            self._held += sum(b.nbytes for b in bufs)
            self._max_held = max(self._max_held, self._held)
        left, bufs = entry
        if len(bufs) != len(parts):
            raise InvalidRegionError(
                f"{self._block_name(k, c)}: got {len(parts)} arrays per piece, earlier {len(bufs)}"
            )
        h, w = parts[0].shape[:2]
        for buf, a in zip(bufs, parts, strict=True):
            buf[y - by : y - by + h, x - bx : x - bx + w] = a
        left[0] -= h * w
        if left[0] < 0:
            raise InvalidRegionError(f"{self._block_name(k, c)} got more pixels than it has: some came twice")
        if left[0]:
            return
        del self._bufs[k, c]
        self._held -= sum(b.nbytes for b in bufs)
        self._sent[k, c] = True
        self.sink(self.rows[k], self.cols[c], *bufs)

    def finish(self) -> None:
        """Check that every block asked for was handed on."""
        if not self.complete:
            todo = self._sent[self._start : self._stop]
            k, c = (int(i) for i in np.argwhere(~todo)[0])
            k += self._start
            missing = self._bufs[k, c][0][0] if (k, c) in self._bufs else None
            raise InvalidRegionError(
                f"{int((~todo).sum())} blocks were never complete, the first {self._block_name(k, c)}"
                + (f" misses {missing} pixels" if missing is not None else " got no pixel")
                + f" (rows [0, {self.rows_done}) were handed on in full); feed every pixel of the image"
            )

    @property
    def rows_done(self) -> int:
        """Rows from the first block row asked for up to ``rows_done`` have been handed on in full."""
        done = np.asarray(self._sent[self._start : self._stop].all(axis=1))
        k = self._start + (int(np.argmin(done)) if not done.all() else done.size)
        return self.rows[k]


class ClassMapSink:
    """A :data:`BlockSink` writing the stitched image as a class map and/or per-class probabilities.

    Each cell is reduced at once to ``h x w`` class indices (see :func:`class_map`; create the writer with the same
    dtype and ``nodata``) and, with ``probs``, ``h x w x C`` float32 (see :func:`probabilities`; e.g. a
    ``GeoTiffWriter`` with ``count=C, dtype=float32, nodata=nan``), and written at once as a window: the sink holds
    nothing (the writers hold their partial tiles, see theirs). :meth:`finish` checks every pixel was written.
    """

    def __init__(
        self,
        grid: TileGrid,
        classes: WindowWriter | None,
        probs: WindowWriter | None = None,
        *,
        nodata: int = 255,
        dtype: DTypeLike = np.uint8,
    ) -> None:
        if classes is None and probs is None:
            raise ConfigError("ClassMapSink needs a class-map writer, a probability writer, or both")
        self.classes, self.probs, self.nodata, self.dtype = classes, probs, nodata, dtype
        self.pixels, self.total = 0, grid.width * grid.height

    def __call__(self, y0: int, x0: int, logits: np.ndarray, valid: np.ndarray) -> None:
        if self.classes is not None:
            self.classes.write(class_map(logits, valid, self.nodata, self.dtype), x0, y0)
        if self.probs is not None:
            self.probs.write(np.moveaxis(probabilities(logits, valid), 0, -1), x0, y0)
        self.pixels += valid.size

    def finish(self) -> None:
        if self.pixels != self.total:
            raise InvalidRegionError(
                f"{self.pixels} of {self.total} pixels were written; feed every tile to the stitcher and finish it"
            )
