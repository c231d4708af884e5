"""Reading tiles in worker processes: a torch Dataset over a TileGrid whose workers each open their own handle.

OpenSlide and GDAL handles must not cross processes, so a handle is opened lazily in whichever process first
reads, and reopened if the dataset finds itself in a new process (a DataLoader worker after fork). What must be
shared crosses the fork instead: which deflate tiles were verified already (see :meth:`TileDataset.share_checksums`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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


class _TileLoader(DataLoader):
    """A DataLoader whose workers' typed errors keep their one-line messages (see :func:`worker_error`)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator over the base iterator
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DenseVisionError as e:
                raise worker_error(e) from e.__cause__
            yield batch


def tile_loader(
    dataset: TileDataset,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    prefetch: int = 2,
    collate: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Batches of tiles in order, read by ``workers`` processes with at most ``prefetch`` batches queued each. A
    tile that cannot be read stops the loader with the reader's own typed error (e.g. CorruptImageError naming the
    window), also when a worker process read it. ``collate``: how a batch's items are put together (default: stacked
    tensors)."""
    if workers > 0:
        dataset.share_checksums()
    return _TileLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
        collate_fn=collate,
    )
