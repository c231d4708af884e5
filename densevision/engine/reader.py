"""Reading tiles in worker processes: a torch Dataset over a TileGrid whose workers each open their own handle.

OpenSlide and GDAL handles must not cross processes, so a handle is opened lazily in whichever process first
reads, and reopened if the dataset finds itself in a new process (a DataLoader worker after fork). What must be
shared crosses the fork instead: which deflate tiles were verified already (see :meth:`TileDataset.share_checksums`),
and the ring of slots the tiles come back in (:class:`_Slots`). Each worker reads the same columns of every tile row
(:func:`reader_runs`), so that the image blocks neighbouring tiles share are decoded once, by one process.
"""

from __future__ import annotations

import collections
import itertools
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from densevision.errors import ConfigError, DenseVisionError, MissingResolutionError
from densevision.io import ImageSource, open_image
from densevision.io.decode import DeflateChecksums
from densevision.io.scaling import ValueScale
from densevision.io.source import resize_region
from densevision.tiling.grid import Tile


@dataclass(frozen=True)
class ReadGeometry:
    """How working pixels (the grid's) map to the file: tiles are read at pyramid ``level`` and resized by
    ``level_per_working`` (level pixels per working pixel, >= 1 when reading a finer level than needed).
    A working pixel covers ``downsample`` level-0 pixels."""

    level: int
    level_per_working: float
    downsample: float


def read_geometry(src: ImageSource, *, level: int | None = None, mpp: float | None = None) -> ReadGeometry:
    """Pick the working resolution: a pyramid level as is, or a target mpp read from the closest finer level."""
    if mpp is None:
        lv = level or 0
        src.check_window((0, 0), lv, (1, 1))
        return ReadGeometry(lv, 1.0, src.level_downsamples[lv])
    if level is not None:
        raise ConfigError("give either a level or a target mpp, not both")
    if src.mpp is None:
        raise MissingResolutionError(
            f"{src.path}: the image has no trustworthy mpp, so --mpp {mpp} cannot be honoured; "
            "pass --level instead, or give the scan resolution"
        )
    target = mpp / src.mpp[0]  # level-0 pixels per working pixel
    lv = src.best_level_for_downsample(target)
    return ReadGeometry(lv, target / src.level_downsamples[lv], target)


class TileDataset(Dataset):
    """Item ``i`` is tile ``tiles[i]``: ``(index, pixels C x T x T tensor, valid T x T bool tensor)``.

    Pixels cross from the worker in the source's dtype when that is uint8 and no ``value_scale`` applies (a quarter
    of float32's bytes through the worker queue, the pinned copy and the host-to-device transfer); the engine
    converts them to float32 on the device, exactly (every uint8 is a float32). Other sources, and any
    ``value_scale`` (which maps raw values to 0..255, see :mod:`densevision.io.scaling`), give float32 as before.

    Each deflate tile's checksum is verified once per dataset, by whichever process reads it first, when the
    workers were forked after :meth:`share_checksums` (as :func:`tile_loader` does); otherwise once per process."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        tiles: Sequence[Tile],
        geometry: ReadGeometry,
        open_options: dict[str, Any] | None = None,
        value_scale: ValueScale | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.value_scale = value_scale
        self.tiles = list(tiles)
        self.geometry = geometry
        self.open_options = open_options or {}
        self._src: ImageSource | None = None
        self._pid = -1
        self._checks: DeflateChecksums | None = None  # the verified-tile flags every process's source adopts
        self._checks_shared = False

    def __len__(self) -> int:
        return len(self.tiles)

    def _source(self) -> ImageSource:
        if self._src is None or self._pid != os.getpid():
            self._src = open_image(self.path, **self.open_options)
            self._pid = os.getpid()
            if self._checks is not None and self._src.checksums is not None:
                self._src.checksums.adopt(self._checks)
        return self._src

    def share_checksums(self) -> None:
        """Keep the record of verified deflate tiles in memory shared with the processes forked after this call (a
        DataLoader's workers on Linux), so that a tile the windows of several workers touch is inflated once, not
        once per worker. The first call opens the file once more to learn its tiles, unless this process reads it
        already; a pickled dataset (spawn) carries a copy of the flags and then keeps its own."""
        if self._checks_shared:
            return
        if self._src is not None and self._pid == os.getpid():
            self._checks = self._src.checksums
        else:
            with open_image(self.path, **self.open_options) as src:
                self._checks = src.checksums
        if self._checks is not None:
            self._checks.share()
        self._checks_shared = True

    def read(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels T x T x C, valid T x T)`` of a tile at working resolution."""
        return self.read_window(tile.x, tile.y, tile.width, tile.height, (tile.width, tile.height))

    def read_window(self, x: int, y: int, w: int, h: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, valid)`` of the ``w x h`` working pixels at ``(x, y)``, resized to ``size = (width, height)``
        where that differs from what the level gives."""
        g = self.geometry
        loc = (round(x * g.downsample), round(y * g.downsample))
        read = (round(w * g.level_per_working), round(h * g.level_per_working))
        region = self._source().read_region(loc, g.level, read)
        if region.pixels.shape[1::-1] != size:
            region = resize_region(region, size)
        return region.pixels, region.valid

    def item_layout(self) -> tuple[int, int, int, torch.dtype]:
        """``(channels, height, width, dtype)`` of every item's pixels (see :meth:`__getitem__`)."""
        src, tile = self._source(), self.tiles[0]
        dtype = torch.uint8 if src.dtype == np.uint8 and self.value_scale is None else torch.float32
        return src.band_count, tile.height, tile.width, dtype

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        tile = self.tiles[i]
        pixels, valid = self.read(tile)
        if self.value_scale is not None:
            pixels = self.value_scale(pixels)
        dtype = np.uint8 if pixels.dtype == np.uint8 and self.value_scale is None else np.float32
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(dtype, copy=False))
        return tile.index, chw, torch.from_numpy(np.ascontiguousarray(valid))

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle an open handle into a worker.
        state = self.__dict__.copy()
        state["_src"], state["_pid"] = None, -1
        return state


def worker_error(e: DenseVisionError) -> DenseVisionError:
    """The error a reader worker raised, with its own one-line message.

    A DataLoader re-raises a worker's exception in the main process as the same type built from a many-line text
    ("Caught CorruptImageError in DataLoader worker process 1. Original Traceback ..."); the worker's message is
    the traceback's last line. Errors not from a worker come back unchanged."""
    text = str(e)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    if not (text.startswith("Caught ") and "DataLoader worker" in text and lines[-1].startswith(prefix)):
        return e
    error = type(e)(lines[-1][len(prefix) :])
    error.__cause__ = e
    return error


class _Loader(DataLoader):
    """A DataLoader whose workers' typed errors keep their one-line messages (see :func:`worker_error`)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator over the base iterator
        items = super().__iter__()
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except DenseVisionError as e:
                raise worker_error(e) from e.__cause__
            yield item


def _loader(reads: TileDataset, dataset: Dataset, batch_size: int | None, workers: int, **options: Any) -> _Loader:
    """Items of ``dataset`` (made of what ``reads`` reads) in order, read by ``workers`` processes, at most
    ``prefetch`` queued each."""
    if workers > 0:
        reads.share_checksums()
    prefetch = options.pop("prefetch", 2)
    return _Loader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None, persistent_workers=False, **options,
    )  # fmt: skip


RUN_TILES = 8  # the most tiles a reader worker reads as one run (each worker holds ``prefetch`` runs)


def reader_runs(tiles: Sequence[Tile], workers: int, most: int = RUN_TILES) -> list[list[int]]:
    """Positions in ``tiles`` (as a run predicts them: :func:`~densevision.stitch.segmentation.stitch_order`) grouped
    into runs for ``workers`` processes.

    The tiles go in stretches along the columns: a tile row, or an interleaved pair of rows (``(r, 0), (r + 1, 0),
    (r, 1), ...``); a stretch ends where the column goes back. Each stretch is cut into bands of adjacent columns,
    as many as the stretch needs for runs of at most ``most`` tiles, rounded up to a multiple of ``workers``, and a
    DataLoader hands run ``k`` to worker ``k % workers``: row after row, every worker reads the same columns. Image
    blocks that neighbouring tiles share are then decoded by one process, from its own block cache, not by each
    worker in turn (one batch to each, the DataLoader's way, has every worker decode nearly every block). Bands that
    a row's skipped tiles leave empty are kept as empty runs, to keep that rhythm. A pair of rows is cut into bands
    holding both rows' tiles: cut as single rows, three runs in four were empty there, and the queues the workers
    fill held one tile each (8192², null model: waiting for tiles 0.7 -> 0.45 s in all, measured)."""
    if not tiles:
        return []
    columns = max(t.col for t in tiles) + 1
    stretch: list[int] = []  # the stretch of each tile
    previous = -1
    for t in tiles:
        stretch.append((stretch[-1] if stretch else 0) + (t.col < previous))
        previous = t.col
    runs: list[list[int]] = []
    for _, group in itertools.groupby(range(len(tiles)), key=stretch.__getitem__):
        positions = list(group)
        depth = max(collections.Counter(tiles[i].col for i in positions).values())  # 2 for a pair of rows
        bands = workers * -(-columns * depth // (workers * most))
        row: list[list[int]] = [[] for _ in range(bands)]
        for i in positions:
            row[tiles[i].col * bands // columns].append(i)
        runs.extend(row)
    return runs


class _Slots:
    """A ring of ``count`` runs of up to ``tiles`` tiles each, in memory shared with the processes forked after it is
    made (anonymous shared mappings, reused run after run). The ``n``-th run with tiles goes into slot
    ``n % count``.

    A DataLoader sends each batch in shared memory made for it, which both processes then touch for the first time:
    a page fault per 64 KiB, 1.2 ms a 512² RGB tile in the model's process alone (measured: 2.5 against 0.17 ms to
    copy 2 tiles out). A slot is touched once. A pickled copy (a spawned worker's) has no slots and sends runs the
    DataLoader's way."""

    def __init__(self, count: int, tiles: int, layout: tuple[int, int, int, torch.dtype]) -> None:
        c, h, w, dtype = layout
        self.count = count
        self.pixels = _shared((count, tiles, c, h, w), dtype)
        self.valid = _shared((count, tiles, h, w), torch.bool)

    def put(self, n: int, items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> _InSlot:
        s = n % self.count
        for j, (_, pixels, valid) in enumerate(items):
            if pixels.shape != self.pixels.shape[2:] or pixels.dtype != self.pixels.dtype:
                raise RuntimeError(f"a tile of {tuple(pixels.shape)} {pixels.dtype} for slots of {self.pixels.shape}")
            self.pixels[s, j].copy_(pixels)
            self.valid[s, j].copy_(valid)
        return _InSlot(s, [i for i, _, _ in items])

    def get(self, run: _InSlot) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        n = len(run.index)
        return run.index, self.pixels[run.slot, :n], self.valid[run.slot, :n]


def _shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.frombuffer(mmap.mmap(-1, max(n * dtype.itemsize, 1)), dtype=dtype, count=n).view(shape)


@dataclass(frozen=True)
class _InSlot:
    """A run that a worker wrote into a slot: which slot, and the grid indexes of its tiles."""

    slot: int
    index: list[int]


class _Runs(Dataset):
    """Item ``k``: run ``k`` of a :class:`TileDataset`'s tiles (see :func:`reader_runs`), written into the shared
    slots when there are any, else stacked (in the worker's shared memory, as a DataLoader batch is); None for an
    empty run."""

    def __init__(self, dataset: TileDataset, runs: list[list[int]], slots: _Slots | None) -> None:
        self.dataset, self.runs, self.slots = dataset, runs, slots
        self.filled = list(itertools.accumulate(len(run) > 0 for run in runs))  # runs with tiles up to each

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, k: int) -> Any:
        run = self.runs[k]
        if not run:
            return None
        items = [self.dataset[i] for i in run]
        return self.slots.put(self.filled[k] - 1, items) if self.slots is not None else default_collate(items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "slots": None}  # a pickled copy cannot write the shared slots


@dataclass
class TileBatch:
    """Consecutive tiles of a :class:`TileDataset`: their grid indexes, their pixels (``C x T x T`` each, in the
    dtype they crossed in) in the pieces the reader workers read them, and their ``T x T`` valid masks. The pieces
    may be views of memory that the readers reuse: they hold until the next batch is taken."""

    index: list[int]
    pieces: list[torch.Tensor]
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    @property
    def pixels(self) -> torch.Tensor:
        """The pixels as one ``B x C x T x T`` tensor on the host (a copy when they came in several pieces)."""
        return self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces)


def tile_loader(
    dataset: TileDataset, *, batch_size: int, workers: int, pin_memory: bool = False, prefetch: int = 2
) -> Iterator[TileBatch]:
    """The tiles of ``dataset`` in order, in :class:`TileBatch` es of ``batch_size`` (the last may be shorter),
    read by ``workers`` processes in runs of adjacent tiles (:func:`reader_runs`), at most ``prefetch`` runs queued
    each. A tile that cannot be read stops the loader with the reader's own typed error (e.g. CorruptImageError
    naming the window), also when a worker process read it.

    With ``pin_memory`` the DataLoader's pin thread copies each run into page-locked memory (and pays the first touch
    of the shared memory it came in, beside the model's thread); otherwise runs cross in :class:`_Slots`."""
    runs = reader_runs(dataset.tiles, max(workers, 1), max(batch_size, RUN_TILES) if workers > 0 else batch_size)
    slots = None
    if workers > 0 and not pin_memory and runs:
        # A slot is rewritten once ``prefetch * workers`` later runs were asked for; until then it may hold pieces of
        # the batch being formed (at most one run with tiles a tile; empty runs take no slot, so that the rows of
        # the stitching order's interleaved pairs, one tile a run, do not stretch that span).
        count = prefetch * workers + batch_size + 1
        slots = _Slots(count, max(map(len, runs)), dataset.item_layout())
    items = _loader(dataset, _Runs(dataset, runs, slots), None, workers, pin_memory=pin_memory, prefetch=prefetch)
    index: list[int] = []
    pieces: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    for item in items:
        if item is None:
            continue
        run_index, run_pixels, run_valid = slots.get(item) if isinstance(item, _InSlot) and slots else item
        if isinstance(run_index, torch.Tensor):
            run_index = run_index.tolist()
        start = 0
        while start < len(run_index):
            take = min(batch_size - len(index), len(run_index) - start)
            index += run_index[start : start + take]
            pieces.append(run_pixels[start : start + take])
            valid.append(run_valid[start : start + take])
            start += take
            if len(index) == batch_size:
                yield TileBatch(index, pieces, _copied(valid))
                index, pieces, valid = [], [], []
    if index:
        yield TileBatch(index, pieces, _copied(valid))


def _copied(pieces: list[torch.Tensor]) -> np.ndarray:
    """The pieces as one new array. numpy, on this thread: a torch copy in parallel waits for a core that the reader
    workers hold (7 ms against 0.05 for 2 tiles' masks, measured on 2 cores)."""
    return np.concatenate([p.numpy() for p in pieces])


def window_loader(dataset: TileDataset, *, batch_size: int, workers: int) -> Iterator[list[Any]]:
    """Lists of ``batch_size`` items of ``dataset`` (a subclass reading windows other than the grid's tiles), in
    order, read by ``workers`` processes; errors as for :func:`tile_loader`."""
    return iter(_loader(dataset, dataset, batch_size, workers, collate_fn=list))
