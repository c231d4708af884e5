"""Pyramidal tiled TIFF output for slides (OpenSlide "generic-tiff", QuPath), fed by windows in any order.

Layout: one top-level IFD per level (level 0 first, then each level halved, until a level fits in one tile), all
tiled and deflate-compressed, resolution in pixels per centimetre (``ResolutionUnit = CENTIMETER``) so that
OpenSlide reports ``openslide.mpp-x`` = the level-0 microns per pixel. Not SubIFDs: OpenSlide's generic-tiff reader
takes successive top-level IFDs as levels.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterator
from typing import BinaryIO

import imagecodecs
import numpy as np
import tifffile

from densevision.errors import ConfigError, InvalidRegionError
from densevision.io.atomic import AtomicWriter, as_output_error, disk_errors, remove_quietly, sibling
from densevision.io.writers.geotiff import cast_window
from densevision.io.writers.levels import Downsampling, Pyramid, halve, pyramid_dimensions

__all__ = ["Downsampling", "PyramidLevel", "PyramidTiffWriter", "halve", "pyramid_dimensions"]

# Classic TIFF offsets are 32-bit; switch to BigTIFF well before that (tile tables and IFDs add a little).
_BIGTIFF_ABOVE = 2**32 - 2**26


class PyramidLevel:
    """One pyramid level fed by whole-width rows top to bottom (for generators that produce rows, e.g.
    :func:`densevision.synthetic.slides.make_slide`; :class:`PyramidTiffWriter` takes windows, see
    :class:`~densevision.io.writers.levels.TileLevel`):
    collects rows into a band of ``tile_size`` rows, encodes full bands into tiles appended
    to a spool file with ``encode`` (tile array -> compressed bytes), and hands each finished band on (to be
    halved for the next level). Padding of the bottom / right tiles is ``fill``."""

    def __init__(
        self,
        width: int,
        height: int,
        samples: int,
        tile_size: int,
        encode: Callable[[np.ndarray], bytes],
        fill: int = 0,
    ) -> None:
        self.width, self.height, self.tile_size, self.encode, self.fill_value = width, height, tile_size, encode, fill
        self.band = np.full((tile_size, -(-width // tile_size) * tile_size, samples), fill, dtype=np.uint8)
        self.fill = 0  # rows of self.band in use
        self.rows_done = 0  # rows already encoded
        self.offsets = array("Q")
        self.lengths = array("Q")

    def push(self, rows: np.ndarray, spool: BinaryIO) -> Iterator[np.ndarray]:
        """Add ``rows`` (``h x width x C``); yield each band completed (``tile_size`` rows, fewer at the bottom)."""
        i = 0
        while i < len(rows):
            n = min(len(rows) - i, self.tile_size - self.fill)
            self.band[self.fill : self.fill + n, : self.width] = rows[i : i + n]
            self.fill += n
            i += n
            if self.fill == self.tile_size or self.rows_done + self.fill == self.height:
                yield self._flush(spool)

    def _flush(self, spool: BinaryIO) -> np.ndarray:
        t = self.tile_size
        self.band[self.fill :] = self.fill_value  # padding of the bottom tiles: deterministic bytes
        for x in range(0, self.band.shape[1], t):
            data = self.encode(self.band[:, x : x + t])
            self.offsets.append(spool.tell())
            self.lengths.append(len(data))
            spool.write(data)
        done = self.band[: self.fill, : self.width].copy()
        self.rows_done += self.fill
        self.fill = 0
        return done

    @property
    def complete(self) -> bool:
        return self.rows_done == self.height

    def tiles(self, spool: BinaryIO) -> Iterator[bytes]:
        for offset, length in zip(self.offsets, self.lengths, strict=True):
            spool.seek(offset)
            yield spool.read(length)


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
        # Each level's tile table: where its encoded tiles lie in the spool, row-major.
        self._offsets = [np.zeros(lv.rows * lv.cols, dtype=np.uint64) for lv in self._pyramid.levels]
        self._lengths = [np.zeros(lv.rows * lv.cols, dtype=np.uint64) for lv in self._pyramid.levels]
        self._spool_path = sibling(self.path, ".spool.partial")
        try:
            self._spool: BinaryIO = open(self._spool_path, "w+b")  # noqa: SIM115 (closed by close/abort)
        except OSError as e:
            raise self._open_error(e) from e

    @property
    def held_tiles(self) -> int:
        """Tiles started and not yet complete, all levels together (``tile_size ** 2 * samples`` bytes each)."""
        return self._pyramid.held_tiles

    def _spool_tile(self, level: int, tx: int, ty: int, tile: np.ndarray) -> None:
        """A complete tile of ``level``, encoded into the spool (its padding is ``fill``: deterministic bytes)."""
        # libdeflate's zlib stream: a class-map tile at level 6 in 2.2 ms against zlib's 5.1, 2.4 % larger.
        data = imagecodecs.deflate_encode(tile.tobytes(), level=self.compression_level)
        i = ty * self._pyramid.levels[level].cols + tx
        self._offsets[level][i], self._lengths[level][i] = self._spool.tell(), len(data)
        self._spool.write(data)

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

    def _tiles(self, level: int) -> Iterator[bytes]:
        """``level``'s encoded tiles in row-major order (the order of the TIFF's tile table)."""
        for offset, length in zip(self._offsets[level].tolist(), self._lengths[level].tolist(), strict=True):
            self._spool.seek(offset)
            yield self._spool.read(length)

    def _finish(self) -> None:
        level0, total = self._pyramid.levels[0], self.width * self.height
        if not level0.complete:
            raise InvalidRegionError(
                f"{self.path}: {total - level0.pixels} of {total} pixels were never written; nothing was saved. "
                "Write every pixel of the image"
            )
        assert self._pyramid.complete
        self._spool.flush()
        bigtiff = self._spool.tell() > _BIGTIFF_ABOVE
        resolution = (1e4 / self.mpp[0], 1e4 / self.mpp[1]) if self.mpp else None
        try:
            with tifffile.TiffWriter(self.partial, bigtiff=bigtiff) as tif:
                for i, (w, h) in enumerate(self.level_dimensions):
                    tif.write(
                        self._tiles(i),
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
                self._spool.close()
            finally:
                remove_quietly(self._spool_path)

    def _discard(self) -> None:
        try:
            self._spool.close()  # may fail to flush on a full disk: the spool goes all the same
        finally:
            remove_quietly(self._spool_path)
