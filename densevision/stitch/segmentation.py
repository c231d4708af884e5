"""Stitching per-tile segmentation logits into blocks of the image that are handed on as soon as they are final.

Cells: the image is cut at every edge of every tile's reach: the tile's ``T x T`` window (clipped to the image), or
under the ``crop`` blend its ``owned`` region. Cutting rows at each ``ys[r]`` and ``ys[r] + T`` (``crop``: at the
owned bounds) and columns likewise gives a grid of cells; every tile covers whole cells, so each cell has a fixed
set of contributing tiles (under ``crop`` exactly one). A cell is final once all of its contributors are in (added
or skipped): it is then normalised, handed to the sink and forgotten. Its float32 accumulators (``C x h x w`` sums
of ``w * logits``, ``h x w`` sums of ``w``) exist only from its first contribution until then; a cell whose
contributors were all skipped is never allocated (it is emitted as nodata).

Memory: fed in row-major order (the grid's order) the stitcher holds the strip of rows that the next tile row will
still add to, ``strip = max_r (ys[r] + T - ys[r + 1])`` rows of the whole width (the overlap, unless the last tile row
is shifted inward: then up to ``T - 1``), plus less than one tile: :attr:`max_held_pixels` ``<= strip * W + T * T``,
whatever the width; each held pixel costs ``(C + 1) * 4`` bytes. Batches of ``b`` tiles shuffled within themselves
add up to ``b`` tiles (``<= strip * W + b * T * T``). The ``crop`` blend holds one owned region at most (each cell
is final at its tile's add). Any other order is correct too but holds every cell touched and not yet final.

Per pixel, contributions are summed in float32 in the order the tiles were fed, as a whole-image accumulator would:
the same inputs in the same order give bit-identical blocks.

Sinks for writers that need whole-width rows top to bottom (the pyramid TIFF writer, the work folder's bands):
:class:`BandAssembler` regroups blocks (e.g. their uint8 class maps, see :class:`ClassMapSink`) into row bands.
"""

from __future__ import annotations

import bisect
import itertools
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

# sink(y0, *bands): whole-width rows [y0, y0 + h) from a BandAssembler, top to bottom; each band h x W [x ...], one
# per array stream given to the assembler.
RowSink = Callable[..., None]


def band_edges(grid: TileGrid) -> list[int]:
    """Row bounds of the grid's bands: band ``k`` is the rows ``[ys[k], ys[k + 1])`` (the last ``[ys[-1], H)``),
    the rows whose last contributing tile row is ``k``: final once tile rows ``0..k`` are in."""
    return [*grid.ys, grid.height]


def _cuts(starts: list[int], bounds: list[tuple[int, int]], tile: int, length: int, crop: bool) -> list[int]:
    """Sorted cell bounds along one axis: every edge of every tile's reach, with 0 and ``length``."""
    edges = {e for b in bounds for e in b} if crop else {e for s in starts for e in (s, min(s + tile, length))}
    return sorted(edges | {0, length})


class SegmentationStitcher:
    """Accumulates ``C x T x T`` tile logits over ``grid`` with blend weights and hands final cells to ``sink``.

    Feed every tile of the grid exactly once, in any order, with :meth:`add` (its prediction) or :meth:`skip` (no
    prediction: its area gets weight 0). Then :meth:`finish` checks nothing is missing. The sink gets every cell
    once, when it is final (see the module docstring and :data:`BlockSink`): one call per cell, not merged, in the
    order (row, column) of the cells that the current ``add`` / ``skip`` completes.

    Example::

        sink = ClassMapSink(grid, writer)  # cells -> class map -> whole-width bands -> writer
        stitcher = SegmentationStitcher(grid, 19, "gaussian", sink)
        for tile, logits, valid in predictions:  # logits C x T x T, valid T x T
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
        keep = ws > 0
        if not (np.isfinite(ls).all(axis=0) | ~keep).all():
            raise InvalidRegionError(
                f"tile #{tile.index} (row {tile.row}, col {tile.col}): non-finite logits where the tile is valid; "
                "check the model and its input (e.g. float16 overflow), or mark those pixels invalid"
            )
        contrib = np.where(keep, ls * ws, 0)  # NaN / garbage under weight 0 (padding) must not leak
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
                np.zeros((self.num_classes, h, w), dtype=np.float32),
                np.zeros((h, w), dtype=np.float32),
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
    """What :class:`ClassMapSink` writes to: ``GeoTiffWriter`` and ``PyramidTiffWriter`` (``H x W [x C]``)."""

    def write(self, array: np.ndarray, x: int, y: int) -> None: ...


class BandAssembler:
    """Regroups blocks (e.g. a :class:`SegmentationStitcher`'s cells, once reduced to class maps) into whole-width
    row bands and hands them to ``sink`` top to bottom.

    ``edges`` are the band bounds ``0 = e_0 < e_1 < ... < e_n = height`` (e.g. :func:`band_edges`: the grid's
    bands). Call the assembler with ``(y0, x0, *blocks)``: one or more arrays of the same ``h x w [x ...]`` pixels
    at rows ``[y0, y0 + h)``, columns ``[x0, x0 + w)``; a block may straddle bands. Band ``k`` is handed on as
    ``sink(e_k, *bands)`` (``(e_{k+1} - e_k) x width [x ...]``, the dtype of the first block that reached it) once
    all its pixels have come, after every band above it. Every pixel must come exactly once.

    ``bands = (a, b)`` assembles only bands ``a .. b - 1`` (e.g. a rank's share, or what a resume still needs):
    parts of blocks outside them are dropped, and band ``a`` is the first handed on.

    Memory: each band's buffers are allocated at its first block and freed when it is handed on, ``band height x
    width x`` the bytes of one pixel of each stream (1 for a uint8 class map, ``4 * C`` for float32 probabilities).
    Fed by a stitcher in row-major order, about one band is held (the one the current tile row completes); bands
    below it are only touched early if their tiles are skipped early, so skip tiles in row-major order too.
    """

    def __init__(self, width: int, edges: list[int], sink: RowSink, *, bands: tuple[int, int] | None = None) -> None:
        if width < 1 or len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ConfigError(f"band edges must increase from 0 to the height, got {edges[:8]} (width {width})")
        n = len(edges) - 1
        a, b = bands if bands is not None else (0, n)
        if not 0 <= a <= b <= n:
            raise ConfigError(f"bands {bands} must be a range within the {n} bands")
        self.width, self.edges, self.sink = width, list(edges), sink
        self._start, self._stop = a, b
        self._next = a  # the next band to hand on
        self._filled = [0] * n  # pixels received, per band
        self._bufs: dict[int, tuple[np.ndarray, ...]] = {}
        self._held = 0
        self._max_held = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of band buffers allocated now."""
        return self._held

    @property
    def max_held_bytes(self) -> int:
        return self._max_held

    @property
    def complete(self) -> bool:
        """Every band asked for has been handed on."""
        return self._next == self._stop

    def __call__(self, y0: int, x0: int, *blocks: Any) -> None:
        arrays = [np.asarray(b) for b in blocks]
        if not arrays or any(a.ndim < 2 or a.shape[:2] != arrays[0].shape[:2] for a in arrays):
            raise InvalidRegionError(
                f"block at ({x0}, {y0}): expected one or more h x w [x ...] arrays of the same size, got shapes "
                f"{[a.shape for a in arrays]}"
            )
        h, w = arrays[0].shape[:2]
        if not (0 <= x0 <= self.width - w and 0 <= y0 <= self.edges[-1] - h):
            raise InvalidRegionError(
                f"block of {w} x {h} pixels at ({x0}, {y0}) leaves the {self.width} x {self.edges[-1]} image"
            )
        k = max(bisect.bisect_right(self.edges, y0) - 1, self._start)
        while k < self._stop and self.edges[k] < y0 + h:
            e0, e1 = self.edges[k], self.edges[k + 1]
            lo, hi = max(y0, e0), min(y0 + h, e1)
            if lo < hi:
                if k < self._next:
                    raise InvalidRegionError(f"band {k} (rows {e0}..{e1}) was complete already: a pixel came twice")
                bufs = self._bufs.get(k)
                if bufs is None:
                    bufs = self._bufs[k] = tuple(
                        np.empty((e1 - e0, self.width, *a.shape[2:]), dtype=a.dtype) for a in arrays
                    )
                    self._held += sum(b.nbytes for b in bufs)
                    self._max_held = max(self._max_held, self._held)
                if len(bufs) != len(arrays):
                    raise InvalidRegionError(f"band {k}: got {len(arrays)} arrays per block, earlier {len(bufs)}")
                for buf, a in zip(bufs, arrays, strict=True):
                    buf[lo - e0 : hi - e0, x0 : x0 + w] = a[lo - y0 : hi - y0]
                self._filled[k] += (hi - lo) * w
                if self._filled[k] > (e1 - e0) * self.width:
                    raise InvalidRegionError(f"band {k} (rows {e0}..{e1}) got more pixels than it has")
            k += 1
        while (
            self._next < self._stop
            and self._filled[self._next] == (self.edges[self._next + 1] - self.edges[self._next]) * self.width
        ):
            bufs = self._bufs.pop(self._next)
            self._held -= sum(b.nbytes for b in bufs)
            self._next += 1
            self.sink(self.edges[self._next - 1], *bufs)

    def finish(self) -> None:
        """Check that every band asked for was handed on."""
        if not self.complete:
            raise InvalidRegionError(
                f"only bands up to row {self.edges[self._next]} were complete; "
                f"{self._filled[self._next]} of {(self.edges[self._next + 1] - self.edges[self._next]) * self.width} "
                "pixels of the next one came. Feed every block of the image"
            )


class ClassMapSink:
    """A :data:`BlockSink` writing the stitched image as a class map and/or per-class probabilities.

    Each cell is reduced at once to ``h x w`` class indices (see :func:`class_map`; create the writer with the same
    dtype and ``nodata``) and, with ``probs``, ``h x w x C`` float32 (see :func:`probabilities`; e.g. a
    ``GeoTiffWriter`` with ``count=C, dtype=float32, nodata=nan``); a :class:`BandAssembler` regroups them into the
    grid's bands, written whole-width top to bottom at ``x = 0`` as the pyramid writer requires. Memory: about one
    band (``stride x W`` pixels) of class indices, and of probabilities with ``probs`` (``4 * C`` bytes a pixel).
    Call :meth:`finish` after the stitcher's to check every band was written.
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
        self.bands = BandAssembler(grid.width, band_edges(grid), self._write)

    def __call__(self, y0: int, x0: int, logits: np.ndarray, valid: np.ndarray) -> None:
        blocks = []
        if self.classes is not None:
            blocks.append(class_map(logits, valid, self.nodata, self.dtype))
        if self.probs is not None:
            blocks.append(np.moveaxis(probabilities(logits, valid), 0, -1))
        self.bands(y0, x0, *blocks)

    def finish(self) -> None:
        self.bands.finish()

    def _write(self, y0: int, *bands: np.ndarray) -> None:
        if self.classes is not None:
            self.classes.write(bands[0], 0, y0)
        if self.probs is not None:
            self.probs.write(bands[-1], 0, y0)
