"""Stitching per-tile segmentation logits into blocks of the image that are handed on as soon as they are final.

Cells: the image is cut at every edge of every tile's reach: the tile's ``T x T`` window (clipped to the image), or
under the ``crop`` blend its ``owned`` region. Cutting rows at each ``ys[r]`` and ``ys[r] + T`` (``crop``: at the
owned bounds) and columns likewise gives a grid of cells; every tile covers whole cells, so each cell has a fixed
set of contributing tiles (under ``crop`` exactly one). A cell is final once all of its contributors are in (added
or skipped): it is then normalised, handed to the sink and forgotten. Its float32 accumulators (``C x h x w`` sums
of ``w * logits``, ``h x w`` sums of ``w``) exist only from its first contribution until then; a cell whose
contributors were all skipped is never allocated (it is emitted as nodata).

Device: the accumulators are torch tensors on the stitcher's ``device``, the model's: the batch's logits are blended
where they were computed, and a final cell is reduced there (:func:`reduce_cell`: ``uint8`` class indices, and
float32 probabilities only when asked) before its copy to the host (non-blocking on CUDA), so only what is written
crosses back. Nothing in :meth:`SegmentationStitcher.add` waits for the device: the blend windows are cached there,
the valid masks are read on the host (they come from the reader), and the check that logits are finite where a
tile has weight rides with the reduced cell (:meth:`ReducedCell.result` raises) instead of synchronising per tile.

Memory: fed in :func:`stitch_order` (row-major, the last two tile rows column by column when the last is shifted
inward) the stitcher holds the strip of rows that the next tile row will still add to, the grid's ``overlap`` rows of
the whole width, plus a few tiles: :attr:`max_held_pixels` ``<= overlap * W + 3 * T * T``; each held pixel costs
``(C + 1) * 4`` bytes. Plain row-major order holds ``strip = max_r (ys[r] + T - ys[r + 1])`` rows instead (up to
``T - 1`` when the last tile row is shifted inward): ``<= strip * W + T * T``. Batches of ``b`` tiles shuffled
within themselves add up to ``b`` tiles. The ``crop`` blend holds one owned region at most (each cell is final at
its tile's add). Any other order is correct too but holds every cell touched and not yet final. Finished cells
handed back for reuse (:meth:`SegmentationStitcher.reuse`) keep up to ``T * T`` pixels more.

Per pixel, contributions are summed in float32 in the order the tiles were fed, as a whole-image accumulator would:
``acc.add_(logits * w)`` (a product rounded to float32, then a sum: not ``addcmul``, whose fused multiply-add rounds
once; the first product is the sum so far), then ``acc / sum(w)``; the same inputs in the same order give
bit-identical blocks, on the CPU the same values as the numpy stitcher that came before (``tests/stitch_reference.py``:
the same bits but for the sign of a zero sum, so the same class maps and probabilities). Where a tile has weight 0
(padding, nodata) its product is set to +0 (NaN or garbage there must not leak).

Downstream: writers take the cells as windows (:class:`ClassMapSink`); :class:`BlockAssembler` regroups them into
fixed blocks (e.g. the grid's, :func:`block_edges`, for the work folder of a resumable run).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.blend import check_blend, tile_window
from densevision.stitch.rows import by_rows
from densevision.tiling.grid import Tile, TileGrid, axis_bounds

# sink(y0, x0, logits, valid): one final cell, rows [y0, y0 + h) x columns [x0, x0 + w), as tensors on the
# stitcher's device. logits: C x h x w float32, the blended logits, 0 where no tile had weight (non-finite where a
# tile had weight only if its logits were: reduce_cell's result raises then); valid: h x w bool, False there. Every
# pixel of the image is in exactly one call; the sink owns the tensors (the logits of a cell no tile reached are a
# read-only broadcast of one zero) and may give the logits' memory back with SegmentationStitcher.reuse.
BlockSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# sink(cell): one final cell reduced by the stitcher itself (a stitcher made with a Reduction).
ReducedSink = Callable[["ReducedCell"], None]


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


# Threads for the stitcher's (and its sink's) torch work on the CPU. The reader workers and the model share the cores:
# on 2 busy cores a parallel region waits for a second thread to be scheduled (2 threads: 404 ms per tile of 2
# classes at load 5, one: 23 ms; numpy, single-threaded: 30 ms). Elementwise ops and the order of the sums do not
# depend on it: the bits do not change.
CPU_THREADS = 1


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """torch's intra-op threads at :data:`CPU_THREADS` meanwhile, on the CPU (restored after). Only on the model's
    thread, between its calls: the setting is not a thread's own (set on another thread, ``torch.get_num_threads``
    here changes too)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n <= CPU_THREADS:
        yield
        return
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x`` (a tensor, or an array on the host) as a tensor of ``dtype`` on ``device``; host arrays are copied there
    (read-only ones first copied on the host, which torch cannot wrap)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    a = np.asarray(x)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C")
    return torch.from_numpy(a).to(device=device, dtype=dtype)


class _BufferPool:
    """Freed float32 tensors kept for later ones of as many elements (any shape), up to ``limit`` elements: beyond
    it the oldest go, so that sizes no later cell has (the first row of cells is taller than the next) cannot hold
    the room for good. On the CPU a fresh tensor costs its page faults (a 150-class cell of 384^2: 22k of them)."""

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit, self.device = limit, device
        # Flat tensors by element count, oldest first; `order` holds their counts in the order given (the k-th n in
        # it is the k-th tensor of n elements), so that the oldest of all is dropped first.
        self._free: collections.defaultdict[int, collections.deque[torch.Tensor]] = collections.defaultdict(
            collections.deque
        )
        self._order: collections.deque[int] = collections.deque()
        self.held = 0  # elements kept

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``shape``, uninitialised: the oldest freed one of as many elements, else new."""
        n = math.prod(shape)
        same = self._free.get(n)
        if same:
            self._order.remove(n)  # its first n is this tensor's
            self.held -= n
            return same.popleft().view(shape)
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def give(self, tensor: torch.Tensor) -> None:
        """``tensor`` (contiguous, on the pool's device) is free for a later :meth:`take`."""
        n = tensor.numel()
        if n > self.limit:
            return
        self._free[n].append(tensor.view(-1))
        self._order.append(n)
        self.held += n
        while self.held > self.limit:
            oldest = self._order.popleft()
            self._free[oldest].popleft()
            self.held -= oldest


class SegmentationStitcher:
    """Accumulates ``C x T x T`` tile logits over ``grid`` with blend weights on ``device`` and hands final cells to
    ``sink``.

    Feed every tile of the grid exactly once, in any order, with :meth:`add` (its prediction) or :meth:`skip` (no
    prediction: its area gets weight 0). Then :meth:`finish` checks nothing is missing. The sink gets every cell
    once, when it is final (see the module docstring and :data:`BlockSink`): one call per cell, not merged, in the
    order (row, column) of the cells that the current ``add`` / ``skip`` completes. The sink owns the cell's tensors;
    :meth:`reuse` hands their memory back.

    With ``reduction``, the stitcher reduces each final cell itself (:func:`reduce_cell`) and the sink gets the
    :class:`ReducedCell` (``sink(cell)``); the cell's memory goes back to the stitcher at once. On the CPU the class
    map is then made in one pass with the cell's last contribution (:mod:`densevision.stitch.fused`): the same class
    indices, without writing, dividing and re-reading the ``C x h x w`` sums, and without any sums for a cell with one
    contributor; with probabilities, the same pass leaves the normalised logits for the softmax. The contributions
    before the last go into the sums in numba too, and a large cell's rows are shared with helper threads
    (:mod:`densevision.stitch.rows`).

    Example::

        sink = ClassMapSink(grid, writer)  # cells -> class map (on the device) -> writer windows
        stitcher = SegmentationStitcher(grid, 19, "gaussian", sink, device="cuda")
        for tile, logits, valid in predictions:  # in stitch_order(grid); logits C x T x T (device), valid T x T
            stitcher.add(tile, logits, valid)
        stitcher.finish()
        sink.finish()
    """

    def __init__(
        self,
        grid: TileGrid,
        num_classes: int,
        blend: str,
        sink: BlockSink | ReducedSink,
        *,
        device: str | torch.device = "cpu",
        reduction: Reduction | None = None,
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.grid = grid
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.blend = check_blend(blend)
        self.sink = sink
        self.reduction = reduction
        if reduction is not None:
            check_class_map(num_classes, reduction.nodata, reduction.dtype)
        # The last contribution blended, normalised and reduced in one pass (see the class doc).
        self._fused = reduction is not None and self.device.type == "cpu"
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
        self._cells: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._windows: dict[int, tuple[np.ndarray, torch.Tensor]] = {}  # id(host window) -> (it, its device copy)
        self._buffer: torch.Tensor | None = None
        # Memory for later cells: final cells' logits handed back by the sink (reuse), their weight sums at once.
        self._free = _BufferPool(num_classes * t * t, self.device)
        self._free_sums = _BufferPool(t * t, self.device)
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

    def add(
        self, tile: Tile, logits: torch.Tensor | np.ndarray, valid: np.ndarray | torch.Tensor | None = None
    ) -> None:
        """Add ``tile``'s prediction.

        Args:
            logits: ``C x T x T`` float32, best on the stitcher's device (the model's); a host array is copied there.
            valid: ``T x T`` bool, False for padding / nodata / outside the image (weight 0); None: all valid. Best
                on the host (the reader's): then a tile valid everywhere it reaches costs no masking.
        """
        with _cpu_threads(self.device):
            self._add(tile, logits, valid)

    def _add(self, tile: Tile, logits: torch.Tensor | np.ndarray, valid: np.ndarray | torch.Tensor | None) -> None:
        self._check_tile(tile)
        t, c = self.grid.tile, self.num_classes
        if tuple(logits.shape) != (c, t, t):
            raise InvalidRegionError(
                f"tile #{tile.index}: expected logits of shape C x T x T = {(c, t, t)}, got {tuple(logits.shape)}; "
                "pass one tile's prediction at tile size (crop the batch padding, keep all classes)"
            )
        if valid is not None and tuple(valid.shape) != (t, t):
            raise InvalidRegionError(f"tile #{tile.index}: expected a {t} x {t} valid mask, got {tuple(valid.shape)}")
        self._seen[tile.index] = True
        if self._fused:
            self._add_on_host(tile, logits, valid)
            return
        # The part of the image this tile can contribute to (crop: only its owned region, where its window is 1;
        # the smooth windows are > 0 everywhere): there the weight is 0 exactly where the tile is not valid.
        (y0, y1), (x0, x1) = self._row_reach[tile.row], self._col_reach[tile.col]
        rows, cols = slice(y0 - tile.y, y1 - tile.y), slice(x0 - tile.x, x1 - tile.x)
        ls = _as_tensor(logits, torch.float32, self.device)[:, rows, cols]
        ws = self._window(tile)[rows, cols]
        drop = None  # where the weight is 0 (None: nowhere)
        if isinstance(valid, torch.Tensor):
            keep = valid.to(self.device, torch.bool)[rows, cols]
            ws, drop = ws * keep, ~keep
        elif valid is not None:
            v = np.asarray(valid, dtype=bool)[rows, cols]
            if not v.all():  # read on the host: no wait for the device
                keep = torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
                ws, drop = ws * keep, ~keep
        rc, cc = self._row_cuts, self._col_cuts
        for i, j in self._cells_of(tile):
            a, b, p, q = rc[i] - y0, rc[i + 1] - y0, cc[j] - x0, cc[j + 1] - x0
            cell = self._cells.get((i, j))
            # The first contribution is the sum so far (0 + x is x, but for -0: +0, which no output tells apart).
            acc, wsum = cell if cell is not None else self._new_cell(i, j)
            contrib = acc if cell is None else self._scratch(c, b - a, q - p)
            torch.mul(ls[:, a:b, p:q], ws[a:b, p:q], out=contrib)
            if drop is not None:
                contrib.masked_fill_(drop[a:b, p:q], 0.0)  # NaN / garbage under weight 0 (padding) must not leak
            if cell is None:
                wsum.copy_(ws[a:b, p:q])
            else:
                acc.add_(contrib)
                wsum.add_(ws[a:b, p:q])
            self._contributed(i, j)

    def _add_on_host(
        self, tile: Tile, logits: torch.Tensor | np.ndarray, valid: np.ndarray | torch.Tensor | None
    ) -> None:
        """The CPU stitcher's ``add`` with a reduction: the tile's contributions to its cells in numba's passes
        (:mod:`densevision.stitch.fused`) over its host arrays, the cells it completes reduced in the same pass, each
        large cell's rows shared between threads (:func:`by_rows`)."""
        from densevision.stitch.fused import add_contribution  # numba (61 MiB) only where a CPU stitcher reduces

        host = self._host_tile(tile, logits, valid)
        rc, cc = self._row_cuts, self._col_cuts
        for i, j in self._cells_of(tile):
            at = (rc[i] - tile.y, cc[j] - tile.x)
            cell = self._cells.get((i, j))
            if self._left[i, j] == 1:
                self._left[i, j] = 0
                self._emit_fused(i, j, cell, host, at)
                continue
            acc, wsum = cell if cell is not None else self._new_cell(i, j)
            h, w = wsum.shape
            blend = functools.partial(add_contribution, acc.numpy(), wsum.numpy(), *host, at, cell is None)
            by_rows(blend, h, self.num_classes * w)
            self._contributed(i, j)

    def _host_tile(
        self, tile: Tile, logits: torch.Tensor | np.ndarray, valid: np.ndarray | torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``tile``'s ``C x T x T`` logits and ``T x T`` weights (its window, 0 where not valid) as C-contiguous
        float32 arrays on the host (the stitcher's device: the CPU), for :func:`fused_class_map`."""
        lg = _as_tensor(logits, torch.float32, self.device).contiguous().numpy()
        weights = tile_window(self.blend, tile)
        if valid is not None:
            keep = valid.numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid, dtype=bool)
            if not keep.all():
                weights = weights * keep
        return lg, np.ascontiguousarray(weights, dtype=np.float32)

    def _scratch(self, c: int, h: int, w: int) -> torch.Tensor:
        """A ``c x h x w`` float32 buffer for one cell's products, reused (``C x T x T`` at most, held while the
        stitcher lives: one tile more in the bound; on the CPU a fresh one per cell costs its page faults)."""
        if self._buffer is None:
            self._buffer = torch.empty(self.num_classes * self.grid.tile**2, dtype=torch.float32, device=self.device)
        return self._buffer[: c * h * w].view(c, h, w)

    def _window(self, tile: Tile) -> torch.Tensor:
        """``tile``'s ``T x T`` blend window on the device, copied there once per distinct window."""
        w = tile_window(self.blend, tile)
        cached = self._windows.get(id(w))
        if cached is None or cached[0] is not w:
            cached = self._windows[id(w)] = (w, torch.from_numpy(np.array(w)).to(self.device))
        return cached[1]

    def skip(self, tile: Tile) -> None:
        """Record that ``tile`` has no prediction (e.g. no tissue): its area gets weight 0."""
        self._check_tile(tile)
        self._seen[tile.index] = True
        with _cpu_threads(self.device):
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

    def _new_cell(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell ``(i, j)``'s accumulators at its first contribution, uninitialised: a final cell's, once the sink is
        done with them, or new."""
        h, w = self._shape(i, j)
        cell = self._cells[i, j] = (self._free.take((self.num_classes, h, w)), self._free_sums.take((h, w)))
        self._held += h * w
        self._max_held = max(self._max_held, self._held)
        return cell

    def reuse(self, logits: torch.Tensor) -> None:
        """The sink is done with a final cell's ``logits`` (its reduction at least queued on their device): their
        memory may serve a later cell of as many pixels (on the CPU each new cell costs its page faults). Up to a
        tile's pixels are kept, the oldest dropped first. Call it from the stitcher's thread (a sink that never does
        gets new tensors for every cell)."""
        if logits.shape[0] == self.num_classes and logits.is_contiguous() and logits.device == self.device:
            self._free.give(logits)  # else not a cell's own logits (e.g. the broadcast zero of a cell no tile reached)

    def _contributed(self, i: int, j: int) -> None:
        """One more contributor of cell ``(i, j)`` is in: emit the cell if it was the last."""
        self._left[i, j] -= 1
        if self._left[i, j]:
            return
        y0, x0, (h, w) = *self._corner(i, j), self._shape(i, j)
        cell = self._cells.get((i, j))
        if self._fused and cell is not None:  # the last contributor was skipped: the sums alone, in one pass
            self._emit_fused(i, j, cell, None, (0, 0))
            return
        self._cells.pop((i, j), None)
        if cell is None:  # every contributor was skipped: all nodata, nothing allocated
            logits = torch.zeros((), dtype=torch.float32, device=self.device).expand(self.num_classes, h, w)
            valid = torch.zeros((h, w), dtype=torch.bool, device=self.device)
        else:
            self._held -= h * w
            logits, wsum = cell
            valid = wsum > 0
            logits.div_(torch.where(valid, wsum, 1.0))  # where no tile had weight the sums are +0: 0 / 1
            self._free_sums.give(wsum)  # on CUDA: reused after this, in stream order
        self._sent(i)
        r = self.reduction
        if r is None:
            cast(BlockSink, self.sink)(y0, x0, logits, valid)
            return
        reduced = reduce_cell(
            y0, x0, logits, valid, probs=r.probs, nodata=r.nodata, dtype=r.dtype, probs_dtype=r.probs_dtype
        )
        self.reuse(logits)  # on CUDA: reused after the reduction, in stream order
        cast(ReducedSink, self.sink)(reduced)

    def _emit_fused(
        self,
        i: int,
        j: int,
        cell: tuple[torch.Tensor, torch.Tensor] | None,
        last: tuple[np.ndarray, np.ndarray] | None,
        at: tuple[int, int],
    ) -> None:
        """Cell ``(i, j)``, final, to the sink: its class map made in one pass (:func:`fused_class_map`) from its
        sums so far (``cell``) and its last contribution (``last``: the tile's logits and weights, the cell at
        ``at`` in the tile), and with probabilities their softmax; its sums' memory back to the pools."""
        r = self.reduction
        assert r is not None
        y0, x0, (h, w) = *self._corner(i, j), self._shape(i, j)
        classes = torch.empty((h, w), dtype=r.dtype)
        values = self._free.take((self.num_classes, h, w)) if r.probs else None  # the normalised logits
        acc = wsum = None
        if cell is not None:
            del self._cells[i, j]
            self._held -= h * w
            acc, wsum = (t.numpy() for t in cell)
        logits, weights = last if last is not None else (None, None)
        from densevision.stitch.fused import fused_class_map, normalise  # numba only where a CPU stitcher reduces

        out, kept = classes.numpy(), None if values is None else values.numpy()
        finite = all(by_rows(
            lambda r0, r1: fused_class_map(
                out, acc=acc, wsum=wsum, logits=logits, weights=weights, at=at, nodata=r.nodata, values=kept,
                rows=(r0, r1),
            ),
            h, self.num_classes * w,
        ))  # fmt: skip
        if cell is not None:
            self._free.give(cell[0])
            self._free_sums.give(cell[1])
        probs = None
        if values is not None:  # nodata: no tile had weight
            done = self.num_classes > 1  # the pass left the values less their maximum: the softmax ends here
            if done:  # torch's exp (the reference's bits), then the sum and the division in the reference's order
                values.exp_()
                by_rows(functools.partial(normalise, values.numpy()), h, self.num_classes * w)
            probs = stored_probabilities(values, classes != r.nodata, r.probs_dtype, in_place=True, normalised=done)
            if not probs.is_set_to(values):  # float32: the probabilities are `values`, handed on with the cell
                self._free.give(values)
        self._sent(i)
        cast(ReducedSink, self.sink)(ReducedCell(y0, x0, (h, w), classes, probs, torch.tensor(finite), None))

    def _corner(self, i: int, j: int) -> tuple[int, int]:
        return self._row_cuts[i], self._col_cuts[j]

    def _shape(self, i: int, j: int) -> tuple[int, int]:
        return self._row_cuts[i + 1] - self._row_cuts[i], self._col_cuts[j + 1] - self._col_cuts[j]

    def _sent(self, i: int) -> None:
        """A cell of row ``i`` went to the sink."""
        self._unsent[i] -= 1
        while self._rows_sent < len(self._unsent) and self._unsent[self._rows_sent] == 0:
            self._rows_sent += 1


def check_class_map(num_classes: int, nodata: int, dtype: torch.dtype) -> None:
    """Raise :class:`ConfigError` unless class indices of ``num_classes`` classes (two for one sigmoid class) and
    ``nodata`` fit ``dtype`` with ``nodata`` no class's index."""
    info = torch.iinfo(dtype)
    if not (max(num_classes, 2) <= nodata <= info.max):
        raise ConfigError(
            f"nodata {nodata} must not be a class index (0..{max(num_classes, 2) - 1}) and must fit {dtype} "
            f"(<= {info.max}); use nodata={info.max} or a wider dtype"
        )


def class_map(
    logits: torch.Tensor, valid: torch.Tensor, nodata: int = 255, dtype: torch.dtype = torch.uint8
) -> torch.Tensor:
    """``h x w`` class indices of ``C x h x w`` logits, on their device: the first maximum over classes (as numpy's
    ``argmax``), or ``logit > 0`` when ``C == 1`` (a sigmoid head); ``nodata`` where ``valid`` (``h x w`` bool) is
    False (whatever the logits are there)."""
    c = logits.shape[0]
    check_class_map(c, nodata, dtype)
    if c == 1:
        classes = logits[0] > 0
    elif logits.device.type == "cpu":
        # Class by class (a later class wins only when strictly greater: the first maximum): on the CPU 1.8x
        # faster than max(dim=0).indices with 150 classes, which reduces the leading dimension element by element.
        # Class k exceeds every index so far, so where it wins the index is max(index, k * wins): branch-free, where
        # masked_fill_ with a mask of random density costs 7x a comparison (class map of 150 classes: 57 ms per
        # 448^2 against 107; of 2: 0.4 against 2.5).
        index = torch.uint8 if c <= 256 else torch.int32
        shape = logits.shape[1:]
        best, classes = logits[0], torch.zeros(shape, dtype=index)
        wins, step = torch.empty(shape, dtype=torch.bool), torch.empty(shape, dtype=index)
        for k in range(1, c):
            torch.gt(logits[k], best, out=wins)
            if index == torch.uint8:
                torch.mul(wins.view(torch.uint8), k, out=step)
            else:  # a uint8 product would wrap above 255
                step.copy_(wins).mul_(k)
            torch.maximum(classes, step, out=classes)
            if k + 1 < c:
                best = torch.maximum(best, logits[k], out=best if k > 1 else None)  # the first: a copy, not logits[0]
    else:
        classes = logits.max(dim=0).indices  # the first maximal index, as numpy's argmax
    return torch.where(valid, classes.to(dtype), nodata)


def probabilities(logits: torch.Tensor, valid: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """``C x h x w`` float32 softmax over classes (sigmoid when ``C == 1``), on the logits' device; NaN where
    ``valid`` is False. ``in_place``: in the memory of ``logits`` (float32), which then hold the probabilities.

    Probabilities of the blended logits (blending logits, then softmax, as mmsegmentation's slide inference)."""
    x = logits.float()
    if x.shape[0] == 1:
        p = 1 / (1 + torch.exp(-x))
    else:
        # The same operations in the same order as exp(x - max) / sum, in one buffer (448^2 x 5 on one core: 1.2 ms
        # against 3.5 with a new tensor per step).
        m = x.amax(dim=0, keepdim=True)
        p = torch.sub(x, m, out=x) if in_place else x - m
        p.exp_()
        # Summed class by class, in order, as numpy sums along the first axis: torch's own sum over dim 0 orders
        # the float32 additions differently (up to 2e-6 apart in the probabilities with 150 classes).
        total = p[0].clone()
        for k in range(1, p.shape[0]):
            total += p[k]
        p /= total
    return _nan_where_invalid(p, valid)


def _nan_where_invalid(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if p.device.type == "cpu" and bool(valid.all()):  # nothing to fill (on CUDA the test would wait for the device)
        return p
    return p.masked_fill_(~valid, float("nan"))


# Probabilities as written: float32 (NaN where no tile had weight), or uint8 ``round(p * 254)`` with 255 as nodata (a
# GeoTIFF band scale of 1 / 254 gives GDAL readers the probability back; a quarter of float32's bytes). Not float16:
# GDAL before 3.11 has no such type. Band-sequential (``C x h x w``) from the stitcher to the file, whose bands are
# stored apart: no step transposes them.
PROBABILITY_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}
UINT8_PROBABILITY_SCALE = 254
UINT8_PROBABILITY_NODATA = 255


def stored_probabilities(
    logits: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype, *, in_place: bool = False, normalised: bool = False
) -> torch.Tensor:
    """``C x h x w`` probabilities (:func:`probabilities`, ``in_place`` as there) of ``C x h x w`` blended logits, in
    the stored ``dtype`` (see :data:`PROBABILITY_DTYPES`), on their device. ``normalised``: ``logits`` are float32
    probabilities already (the CPU stitcher's), in whose memory NaN goes where not ``valid``."""
    p = _nan_where_invalid(logits, valid) if normalised else probabilities(logits, valid, in_place=in_place)
    if dtype == torch.uint8:
        scaled = (p * UINT8_PROBABILITY_SCALE).round_()
        return scaled.masked_fill_(~valid, UINT8_PROBABILITY_NODATA).to(torch.uint8)
    return p.to(dtype)


@dataclass(frozen=True)
class Reduction:
    """What a stitcher's final cells are reduced to (see :func:`reduce_cell`): ``uint8`` (``dtype``) class indices
    with ``nodata``, and with ``probs`` probabilities in ``probs_dtype``."""

    probs: bool = False
    nodata: int = 255
    dtype: torch.dtype = torch.uint8
    probs_dtype: torch.dtype = torch.float32


@dataclass(eq=False)
class ReducedCell:
    """A final cell reduced on the device (:func:`reduce_cell`), on its way to the host."""

    y0: int
    x0: int
    shape: tuple[int, int]
    _classes: torch.Tensor | None
    _probs: torch.Tensor | None
    _finite: torch.Tensor
    _copied: torch.cuda.Event | None

    def result(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(h x w class indices, C x h x w probabilities)`` on the host (None for what was not asked),
        once the copies are done (this waits for them, and so for the device's work up to the cell's reduction).

        Raises:
            InvalidRegionError: the cell's logits were not finite where a tile had weight.
        """
        if self._copied is not None:
            self._copied.synchronize()
        if not bool(self._finite):
            (h, w), y, x = self.shape, self.y0, self.x0
            raise InvalidRegionError(
                f"non-finite logits in rows {y}..{y + h}, columns {x}..{x + w} of the stitched image, where a tile "
                "is valid; check the model and its input (e.g. float16 overflow), or mark those pixels invalid"
            )
        return tuple(None if t is None else t.numpy() for t in (self._classes, self._probs))  # type: ignore[return-value]


def reduce_cell(
    y0: int,
    x0: int,
    logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    classes: bool = True,
    probs: bool = False,
    nodata: int = 255,
    dtype: torch.dtype = torch.uint8,
    probs_dtype: torch.dtype = torch.float32,
) -> ReducedCell:
    """A stitcher's final cell (see :data:`BlockSink`) reduced on its device to what is written: ``h x w`` class
    indices (:func:`class_map`) and, with ``probs``, ``C x h x w`` probabilities (:func:`probabilities`) in
    ``probs_dtype`` (:func:`stored_probabilities`), then copied to the host, without waiting on CUDA
    (:meth:`ReducedCell.result` waits).

    With the reduction goes one flag: whether the logits are finite (their sum is; 0 where no tile had weight), so
    that a non-finite logit where a tile is valid stops the run when the cell is final, not with a wait per tile."""
    with _cpu_threads(logits.device):
        finite = torch.isfinite(logits.sum())
        cmap = class_map(logits, valid, nodata, dtype) if classes else None
        p = None
        if probs:
            p = stored_probabilities(logits, valid, probs_dtype)
    out = [cmap, p, finite]
    copied = None
    if logits.device.type == "cuda":
        out = [None if t is None else t.to("cpu", non_blocking=True) for t in out]
        copied = torch.cuda.Event()
        copied.record()
    else:
        out = [None if t is None else t.cpu() for t in out]
    h, w = valid.shape
    assert out[2] is not None
    return ReducedCell(y0, x0, (h, w), out[0], out[1], out[2], copied)


class WindowWriter(Protocol):
    """What :class:`ClassMapSink` writes to: ``GeoTiffWriter`` and ``PyramidTiffWriter`` (``h x w [x C]`` windows
    at ``(x, y)``, in any order)."""

    def write(self, array: np.ndarray, x: int, y: int) -> None: ...


class BandWriter(Protocol):
    """Where :class:`ClassMapSink` writes probabilities: ``GeoTiffWriter`` (``C x h x w`` windows at ``(x, y)``)."""

    def write_bands(self, array: np.ndarray, x: int, y: int) -> None: ...


def _check_edges(edges: list[int], what: str) -> None:
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ConfigError(f"{what} edges must increase from 0 to the image's size, got {edges[:8]}")


class BlockAssembler:
    """Regroups pieces of the image (e.g. a :class:`SegmentationStitcher`'s cells, once reduced to class maps) into
    the blocks of a fixed grid, and hands each block to ``sink`` once all its pixels have come.

    Block ``(k, c)`` is rows ``[rows[k], rows[k + 1])`` x columns ``[cols[c], cols[c + 1])`` (edges increasing from 0
    to the height / width; e.g. :func:`block_edges`: the grid's rows and columns of tiles). Call the assembler with
    ``(y0, x0, *pieces)``: one or more arrays of the same ``[... x] h x w`` pixels (the last two axes are rows and
    columns: ``h x w`` class indices, ``C x h x w`` probabilities) at rows ``[y0, y0 + h)``, columns ``[x0, x0 + w)``;
    a piece may straddle blocks. A complete block goes out as ``sink(y0, x0, *blocks)`` (one array
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
        sink: Callable[..., None],
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
        if not arrays or any(a.ndim < 2 or a.shape[-2:] != arrays[0].shape[-2:] for a in arrays):
            raise InvalidRegionError(
                f"block at ({x0}, {y0}): expected one or more [... x] h x w arrays of the same size, got shapes "
                f"{[a.shape for a in arrays]}"
            )
        h, w = arrays[0].shape[-2:]
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
                    self._put(k, c, [a[..., r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] for a in arrays], r0, c0)

    def _put(self, k: int, c: int, parts: list[np.ndarray], y: int, x: int) -> None:
        if self._sent[k, c]:
            raise InvalidRegionError(f"{self._block_name(k, c)} was complete already: a pixel came twice")
        entry = self._bufs.get((k, c))
        by, bx = self.rows[k], self.cols[c]
        if entry is None:
            bh, bw = self.rows[k + 1] - by, self.cols[c + 1] - bx
            bufs = tuple(np.empty((*a.shape[:-2], bh, bw), dtype=a.dtype) for a in parts)
            entry = self._bufs[k, c] = ([bh * bw], bufs)
            self._held += sum(b.nbytes for b in bufs)
            self._max_held = max(self._max_held, self._held)
        left, bufs = entry
        if len(bufs) != len(parts):
            raise InvalidRegionError(
                f"{self._block_name(k, c)}: got {len(parts)} arrays per piece, earlier {len(bufs)}"
            )
        h, w = parts[0].shape[-2:]
        for buf, a in zip(bufs, parts, strict=True):
            buf[..., y - by : y - by + h, x - bx : x - bx + w] = a
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

    Each cell is reduced on the stitcher's device (:func:`reduce_cell`) to ``h x w`` class indices (see
    :func:`class_map`; create the writer with the same dtype and ``nodata``) and, with ``probs``, ``C x h x w``
    float32 (see :func:`probabilities`; e.g. a ``GeoTiffWriter`` with ``count=C, dtype=float32, nodata=nan``, written
    with its ``write_bands``), copied to the host and written at once as a window: the sink holds nothing (the
    writers hold their partial tiles, see theirs). :meth:`finish` checks every pixel was written.
    """

    def __init__(
        self,
        grid: TileGrid,
        classes: WindowWriter | None,
        probs: BandWriter | None = None,
        *,
        nodata: int = 255,
        dtype: torch.dtype = torch.uint8,
    ) -> None:
        if classes is None and probs is None:
            raise ConfigError("ClassMapSink needs a class-map writer, a probability writer, or both")
        self.classes, self.probs, self.nodata, self.dtype = classes, probs, nodata, dtype
        self.pixels, self.total = 0, grid.width * grid.height

    def __call__(self, y0: int, x0: int, logits: torch.Tensor, valid: torch.Tensor) -> None:
        cell = reduce_cell(
            y0, x0, logits, valid, classes=self.classes is not None, probs=self.probs is not None,
            nodata=self.nodata, dtype=self.dtype,
        )  # fmt: skip
        cmap, probs = cell.result()
        if self.classes is not None and cmap is not None:
            self.classes.write(cmap, x0, y0)
        if self.probs is not None and probs is not None:
            self.probs.write_bands(probs, x0, y0)
        self.pixels += valid.numel()

    def finish(self) -> None:
        if self.pixels != self.total:
            raise InvalidRegionError(
                f"{self.pixels} of {self.total} pixels were written; feed every tile to the stitcher and finish it"
            )
