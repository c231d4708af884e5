"""Pyramidal tiled TIFF output for slides (OpenSlide "generic-tiff", QuPath), fed by windows in any order.

Layout: one top-level IFD per level (level 0 first, then each level halved, until a level fits in one tile), all
tiled and deflate-compressed, resolution in pixels per centimetre (``ResolutionUnit = CENTIMETER``) so that
OpenSlide reports ``openslide.mpp-x`` = the level-0 microns per pixel. Not SubIFDs: OpenSlide's generic-tiff reader
takes successive top-level IFDs as levels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

import imagecodecs
import numpy as np
import tifffile

from densevision.errors import ConfigError, InvalidRegionError
from densevision.io.atomic import AtomicWriter, as_output_error, disk_errors, remove_quietly, sibling
from densevision.io.writers.geotiff import cast_window
from densevision.io.writers.levels import Downsampling, Pyramid, halve, pyramid_dimensions

__all__ = ["Downsampling", "PyramidTiffWriter", "TileSpool", "halve", "pyramid_dimensions"]

# Classic TIFF offsets are 32-bit; switch to BigTIFF well before that (tile tables and IFDs add a little).
_BIGTIFF_ABOVE = 2**32 - 2**26


class TileSpool:
    """The encoded tiles of a pyramid's levels (sizes ``dimensions``, tiles of ``tile_size``) appended to ``file``
    as they come, in any order, and read back level by level in row-major order: a TIFF's tile table."""

    def __init__(self, file: BinaryIO, dimensions: list[tuple[int, int]], tile_size: int) -> None:
        self.file = file
        self._cols = [-(-w // tile_size) for w, _ in dimensions]
        rows = [-(-h // tile_size) for _, h in dimensions]
        self._offsets = [np.zeros(c * r, dtype=np.uint64) for c, r in zip(self._cols, rows, strict=True)]
        self._lengths = [np.zeros_like(o) for o in self._offsets]

    def add(self, level: int, tx: int, ty: int, data: bytes | bytearray) -> None:
        """Tile ``(tx, ty)`` of ``level``, encoded."""
        i = ty * self._cols[level] + tx
        self._offsets[level][i], self._lengths[level][i] = self.file.tell(), len(data)
        self.file.write(data)

    def tiles(self, level: int) -> Iterator[bytes]:
        """``level``'s encoded tiles in row-major order."""
        for offset, length in zip(self._offsets[level].tolist(), self._lengths[level].tolist(), strict=True):
            self.file.seek(offset)
            yield self.file.read(length)


class PyramidTiffWriter(AtomicWriter):
    """A pyramidal, tiled, deflate-compressed uint8 TIFF of ``width x height`` pixels for slide outputs.

    ``samples=1``: a single-channel class map (minisblack; level 0 round-trips exactly; lower levels by 2 x 2
    ``mode`` unless ``downsampling`` says otherwise). ``samples=3``: an RGB overlay (lower levels by ``mean``).
    ``mpp`` is the level-0 resolution in microns per pixel (``x, y`` or one number), stored as pixels per cm.

    Feed level 0 with :meth:`write`: windows of any size, in any order, every pixel exactly once. A tile is encoded
    as soon as its last pixel arrives, and its 2 x 2 reduction goes into the level below (tiles start at multiples
    of ``tile_size``, which is even, so the reduction per tile equals the reduction of the whole level). The file
    does not depend on the order of the windows.

    Memory: the tiles started and not yet complete, ``tile_size ** 2 * samples`` bytes each, on every level. Whole-
    width bands top to bottom hold one row of tiles per level (about ``2 x tile_size x width x samples`` bytes in
    all); windows fed in column strips ``S`` pixels wide (``S`` a multiple of ``tile_size``), top to bottom within
    each strip, hold about ``2 x tile_size x S x samples`` bytes plus, on the levels whose tiles are wider than the
    strip, one column of tiles (``height / 2**level x tile_size`` bytes; small). Encoded tiles are spooled to
    ``<path>.spool.partial`` and copied into the TIFF by :meth:`close`, so the directory needs about twice the
    output's size while writing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        *,
        samples: int = 1,
        mpp: float | tuple[float, float] | None = None,
        tile_size: int = 512,
        downsampling: Downsampling | None = None,
        compression_level: int = 6,
        description: str | None = None,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ConfigError(f"output size must be positive, got {width} x {height}")
        if samples not in (1, 3):
            raise ConfigError(f"samples must be 1 (class map) or 3 (RGB), got {samples}")
        if tile_size <= 0 or tile_size % 16:
            raise ConfigError(f"tile_size must be a positive multiple of 16 (TIFF tiles), got {tile_size}")
        how: Downsampling = downsampling or ("mode" if samples == 1 else "mean")
        if how not in ("mode", "nearest", "mean"):
            raise ConfigError(f"downsampling must be 'mode', 'nearest' or 'mean', got {how!r}")
        if how == "mode" and samples != 1:
            raise ConfigError("downsampling='mode' is for single-channel class maps; use 'mean' or 'nearest' for RGB")
        mpp_xy = (mpp, mpp) if isinstance(mpp, (int, float)) else mpp
        if mpp_xy is not None and not all(v > 0 for v in mpp_xy):
            raise ConfigError(f"mpp must be positive microns per pixel, got {mpp!r}")
        super().__init__(path)
        self.width, self.height, self.samples, self.tile_size = int(width), int(height), samples, tile_size
        self.mpp = mpp_xy
        self.downsampling = how
        self.description = description
        self.level_dimensions = pyramid_dimensions(self.width, self.height, tile_size)

        self.compression_level = compression_level
        self._pyramid = Pyramid(self.width, self.height, samples, tile_size, how, self._spool_tile)
        self._spool_path = sibling(self.path, ".spool.partial")
        try:
            spool = open(self._spool_path, "w+b")  # noqa: SIM115 (closed by close/abort)
        except OSError as e:
            raise self._open_error(e) from e
        self._spool = TileSpool(spool, self.level_dimensions, tile_size)

    @property
    def held_tiles(self) -> int:
        """Tiles started and not yet complete, all levels together (``tile_size ** 2 * samples`` bytes each)."""
        return self._pyramid.held_tiles

    def _spool_tile(self, level: int, tx: int, ty: int, tile: np.ndarray) -> None:
        """A complete tile of ``level``, encoded into the spool (its padding is ``fill``: deterministic bytes)."""
        # libdeflate's zlib stream: a class-map tile at level 6 in 2.2 ms against zlib's 5.1, 2.4 % larger.
        self._spool.add(level, tx, ty, imagecodecs.deflate_encode(tile.tobytes(), level=self.compression_level))

    def write(self, array: np.ndarray, x: int, y: int) -> None:
        """Write ``array`` (``h x w`` or ``h x w x samples``) with its top-left at level-0 pixel ``(x, y)``; the
        window must lie inside the image and hold no pixel written before."""
        self._check_open()
        a = np.asarray(array)
        if a.ndim == 2:
            a = a[..., None]
        where = f"{self.path}: window at ({x}, {y})"
        if a.ndim != 3 or a.shape[2] != self.samples:
            raise InvalidRegionError(
                f"{where}: expected an H x W x {self.samples} (or H x W) array, got shape {array.shape}"
            )
        h, w = a.shape[:2]
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise InvalidRegionError(
                f"{where} of {w} x {h} pixels leaves the {self.width} x {self.height} image; crop it first"
            )
        if h and w:
            a = cast_window(a, np.dtype(np.uint8), where)
            with disk_errors(self._spool_path):
                self._pyramid.put(a, x, y)

    def _finish(self) -> None:
        level0, total = self._pyramid.levels[0], self.width * self.height
        if not level0.complete:
            raise InvalidRegionError(
                f"{self.path}: {total - level0.pixels} of {total} pixels were never written; nothing was saved. "
                "Write every pixel of the image"
            )
        assert self._pyramid.complete
        self._spool.file.flush()
        bigtiff = self._spool.file.tell() > _BIGTIFF_ABOVE
        resolution = (1e4 / self.mpp[0], 1e4 / self.mpp[1]) if self.mpp else None
        try:
            with tifffile.TiffWriter(self.partial, bigtiff=bigtiff) as tif:
                for i, (w, h) in enumerate(self.level_dimensions):
                    tif.write(
                        self._spool.tiles(i),
                        shape=(h, w, self.samples) if self.samples > 1 else (h, w),
                        dtype=np.uint8,
                        tile=(self.tile_size, self.tile_size),
                        compression="zlib",
                        photometric="rgb" if self.samples == 3 else "minisblack",
                        planarconfig="contig",
                        resolution=resolution,
                        resolutionunit="CENTIMETER" if resolution else None,
                        subfiletype=1 if i else 0,  # 1: reduced-resolution image
                        description=self.description if i == 0 else None,
                        metadata=None,
                        software="densevision",
                    )
        except OSError as e:
            raise as_output_error(e, self.partial) from e
        finally:
            try:
                self._spool.file.close()
            finally:
                remove_quietly(self._spool_path)

    def _discard(self) -> None:
        try:
            self._spool.file.close()  # may fail to flush on a full disk: the spool goes all the same
        finally:
            remove_quietly(self._spool_path)
