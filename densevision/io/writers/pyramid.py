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
from typing import BinaryIO, Literal

import imagecodecs
import numpy as np
import tifffile

from densevision.errors import ConfigError, InvalidRegionError
from densevision.io.atomic import AtomicWriter, as_output_error, disk_errors, remove_quietly, sibling
from densevision.io.writers.geotiff import cast_window

Downsampling = Literal["mode", "nearest", "mean"]

# Classic TIFF offsets are 32-bit; switch to BigTIFF well before that (tile tables and IFDs add a little).
_BIGTIFF_ABOVE = 2**32 - 2**26


def pyramid_dimensions(width: int, height: int, tile_size: int) -> list[tuple[int, int]]:
    """Level sizes ``(w, h)``: level 0, then ``ceil(w / 2), ceil(h / 2)`` per level until one fits in a tile."""
    dims = [(width, height)]
    while dims[-1][0] > tile_size or dims[-1][1] > tile_size:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def halve(a: np.ndarray, how: Downsampling) -> np.ndarray:
    """Halve an ``H x W x C`` uint8 array to ``ceil(H / 2) x ceil(W / 2) x C``; odd edges repeat their last
    row / column.

    ``mode``: the most frequent of each 2 x 2 block (ties: the earliest in top-left, top-right, bottom-left,
    bottom-right order), so class maps keep only existing classes. ``nearest``: the top-left pixel. ``mean``: the
    rounded mean (for RGB).
    """
    if how == "nearest":
        return a[::2, ::2]
    h, w = a.shape[:2]
    a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    q = np.stack([a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2]])  # 4 x H/2 x W/2 x C
    if how == "mean":
        return ((q.sum(axis=0, dtype=np.uint16) + 2) // 4).astype(a.dtype)
    # The first pixel wins when it equals another (no other value then has more votes); else the second when it
    # equals a later one; else the third when it equals the fourth; else all differ and the first wins the tie.
    # 2.2x faster than counting each pixel's votes (4096^2 class map: 0.13 s against 0.29 s).
    p, r, s, t = q
    later = np.where((r == s) | (r == t), r, np.where(s == t, s, p))
    return np.where((p == r) | (p == s) | (p == t), p, later)


class PyramidLevel:
    """One pyramid level fed by whole-width rows top to bottom (for generators that produce rows, e.g.
    :func:`densevision.synthetic.slides.make_slide`; :class:`PyramidTiffWriter` takes windows, see :class:`TileLevel`):
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


class TileLevel:
    """One pyramid level fed by windows in any order: each ``tile_size``-square tile is held from its first pixel
    until its last, then encoded into the spool file (recorded under its row-major index) and handed on.

    Memory: the tiles touched and not yet complete, ``tile_size ** 2 * samples`` bytes each (padding included).
    """

    def __init__(
        self,
        width: int,
        height: int,
        samples: int,
        tile_size: int,
        encode: Callable[[np.ndarray], bytes],
        fill: int = 0,
    ) -> None:
        self.width, self.height, self.samples, self.tile_size = width, height, samples, tile_size
        self.encode, self.fill = encode, fill
        self.cols, self.rows = -(-width // tile_size), -(-height // tile_size)
        self.offsets = np.zeros(self.rows * self.cols, dtype=np.uint64)
        self.lengths = np.zeros(self.rows * self.cols, dtype=np.uint64)
        self.done = np.zeros(self.rows * self.cols, dtype=bool)
        self.pixels = 0  # pixels received
        self._partial: dict[int, tuple[np.ndarray, list[int]]] = {}  # index -> (tile, [pixels still missing])

    @property
    def complete(self) -> bool:
        return self.pixels == self.width * self.height

    @property
    def held_tiles(self) -> int:
        return len(self._partial)

    def _area(self, tx: int, ty: int) -> int:
        t = self.tile_size
        return min(t, self.height - ty * t) * min(t, self.width - tx * t)

    def put(self, a: np.ndarray, x: int, y: int, spool: BinaryIO) -> Iterator[tuple[int, int, np.ndarray]]:
        """Add ``a`` (``h x w x samples``, inside the level) at ``(x, y)``; yield ``(tx, ty, pixels)`` for each tile
        it completes: its column, row and ``h x w x samples`` pixels (without padding)."""
        t = self.tile_size
        h, w = a.shape[:2]
        for ty in range(y // t, -(-(y + h) // t)):
            for tx in range(x // t, -(-(x + w) // t)):
                i = ty * self.cols + tx
                y0, y1 = max(y, ty * t), min(y + h, (ty + 1) * t)
                x0, x1 = max(x, tx * t), min(x + w, (tx + 1) * t)
                entry = self._partial.get(i)
                if entry is None:
                    if self.done[i]:
                        raise InvalidRegionError(
                            f"pixels ({x0}, {y0})..({x1}, {y1}) of tile ({tx}, {ty}) came twice: that tile was "
                            "complete already; write every pixel exactly once"
                        )
                    tile = np.full((t, t, self.samples), self.fill, dtype=np.uint8)
                    entry = self._partial[i] = (tile, [self._area(tx, ty)])
                tile, left = entry
                tile[y0 - ty * t : y1 - ty * t, x0 - tx * t : x1 - tx * t] = a[y0 - y : y1 - y, x0 - x : x1 - x]
                left[0] -= (y1 - y0) * (x1 - x0)
                self.pixels += (y1 - y0) * (x1 - x0)
                if left[0] < 0:
                    raise InvalidRegionError(
                        f"tile ({tx}, {ty}) got more pixels than it has: some came twice; write every pixel "
                        "exactly once"
                    )
                if left[0] == 0:
                    del self._partial[i]
                    data = self.encode(tile)  # padding stays ``fill``: deterministic bytes
                    self.offsets[i] = spool.tell()
                    self.lengths[i] = len(data)
                    spool.write(data)
                    self.done[i] = True
                    yield tx, ty, tile[: min(t, self.height - ty * t), : min(t, self.width - tx * t)]

    def tiles(self, spool: BinaryIO) -> Iterator[bytes]:
        """The encoded tiles in row-major order (the order of the TIFF's tile table)."""
        for offset, length in zip(self.offsets.tolist(), self.lengths.tolist(), strict=True):
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

        def encode(tile: np.ndarray) -> bytes:
            return bytes(imagecodecs.zlib_encode(tile.tobytes(), level=compression_level))

        self._levels = [TileLevel(w, h, samples, tile_size, encode) for w, h in self.level_dimensions]
        self._spool_path = sibling(self.path, ".spool.partial")
        try:
            self._spool: BinaryIO = open(self._spool_path, "w+b")  # noqa: SIM115 (closed by close/abort)
        except OSError as e:
            raise self._open_error(e) from e

    @property
    def held_tiles(self) -> int:
        """Tiles started and not yet complete, all levels together (``tile_size ** 2 * samples`` bytes each)."""
        return sum(lv.held_tiles for lv in self._levels)

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
                self._put(0, a, x, y)

    def _put(self, level: int, a: np.ndarray, x: int, y: int) -> None:
        half = self.tile_size // 2
        for tx, ty, tile in self._levels[level].put(a, x, y, self._spool):
            if level + 1 < len(self._levels):
                self._put(level + 1, halve(tile, self.downsampling), tx * half, ty * half)

    def _finish(self) -> None:
        if not self._levels[0].complete:
            raise InvalidRegionError(
                f"{self.path}: {self.width * self.height - self._levels[0].pixels} of {self.width * self.height} "
                "pixels were never "
                "written; nothing was saved. Write every pixel of the image"
            )
        assert all(lv.complete for lv in self._levels)
        self._spool.flush()
        bigtiff = self._spool.tell() > _BIGTIFF_ABOVE
        resolution = (1e4 / self.mpp[0], 1e4 / self.mpp[1]) if self.mpp else None
        try:
            with tifffile.TiffWriter(self.partial, bigtiff=bigtiff) as tif:
                for i, (lv, (w, h)) in enumerate(zip(self._levels, self.level_dimensions, strict=True)):
                    tif.write(
                        lv.tiles(self._spool),
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
