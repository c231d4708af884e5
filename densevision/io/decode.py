"""Damaged files: every backend's failure to read or decode becomes one :class:`CorruptImageError`, in one place.

:func:`decode_errors` wraps every read of an :class:`~densevision.io.source.ImageSource` (``open_image`` itself,
``read_region``, ``thumbnail``, and through them the tissue / nodata masks, the value-range estimate, SAM's windows
and the engine's tile reads). Whatever the backend raises for bytes it cannot use (GDAL's ``RasterioError`` and
``CPLE_*`` errors, ``OpenSlideError``, Pillow's and tifffile's errors, imagecodecs', zlib's and struct's, short
reads surfacing as ``OSError`` / ``EOFError`` / a ``ValueError`` reshaping a short buffer) becomes a one-line
:class:`CorruptImageError` that names the file, what was being read (the window and level) and what to do. A
:class:`~densevision.errors.DenseVisionError` raised inside passes unchanged.

:func:`check_tiff_extents` is the check the backends skip: a TIFF whose tiles or strips point past the end of the
file (a truncated copy) decodes through OpenSlide and GDAL as plausible pixels (a JPEG stream cut short is padded
grey; a missing deflate tail is filled). It reads the directories only (tifffile), never pixel data.

Not detectable by any reader here (measured, see ``tests/test_corrupt.py``): bytes overwritten inside a tile's
JPEG entropy-coded data (JPEG has no checksum), and inside a deflate tile when GDAL / libtiff stop inflating once
the tile is full, before the stream's Adler-32 is reached. Those tiles decode to other pixels of the same tile.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioError

from densevision.errors import CorruptImageError, DenseVisionError

#: What a backend raises for bytes it cannot use. ``RuntimeError`` is imagecodecs' base (``ZlibError``,
#: ``Jpeg8Error``, ...); ``ValueError`` covers tifffile's ``TiffFileError`` and a short buffer that cannot be reshaped;
#: ``OSError`` Pillow's "image file is truncated", GDAL's ``RasterioIOError`` and short reads; ``SyntaxError`` Pillow's
#: bad headers.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    SyntaxError,
    RuntimeError,
    zlib.error,
    struct.error,
    RasterioError,
    CPLE_BaseError,
    openslide.OpenSlideError,
)

WHAT_TO_DO = "the file is damaged (truncated or corrupt): re-export or re-copy it"


def cause_text(e: BaseException) -> str:
    """The backend's own words, on one line: GDAL's "Read failed. See previous exception" is followed to the
    error it points to."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(parts) < 3:
        seen.add(id(cur))
        text = " ".join(str(cur).split()) or type(cur).__name__
        if "see previous exception" not in text.lower():
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    return "; ".join(dict.fromkeys(parts)) or type(e).__name__


@contextlib.contextmanager
def decode_errors(path: str | os.PathLike[str], what: str, recover: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a backend's failure inside the block into ``CorruptImageError("<path>: cannot read <what> (<cause>);
    <what to do>")``.

    ``recover`` runs first (its own failure is ignored): e.g. OpenSlide's errors are sticky, so the slide drops its
    dead handle and reopens it for the next read.

    Example::

        with decode_errors(self.path, f"the window at {location} (level {level}, size {size})", self._recover):
            return self._read(location, level, size)
    """
    try:
        yield
    except DenseVisionError:
        raise
    except DECODE_ERRORS as e:
        if recover is not None:
            with contextlib.suppress(Exception):
                recover()
        raise CorruptImageError(f"{path}: cannot read {what} ({cause_text(e)}); {WHAT_TO_DO}") from e


def check_tiff_extents(path: Path, tif: tifffile.TiffFile, *, sparse_ok: bool = True) -> None:
    """Raise CorruptImageError when the directories of ``tif`` do not fit the file: an entry that cannot be read, a
    tile or strip lying past the end of the file or inside its header, a tile with bytes but no offset (or the
    reverse), or a directory chain that does not end (the next directory cut off). A truncated copy shows all of
    these.

    Tiles a writer left out on purpose (offset and byte count both 0: GDAL's sparse tiles) are allowed unless
    ``sparse_ok`` is False (a file we wrote ourselves, where a missing tile is a failed write). Directories
    tifffile cannot follow at all are left to the backends, which then fail on them."""
    size = os.path.getsize(path)
    t = tif.tiff
    pages: list[tifffile.TiffPage] = []
    try:
        for page in tif.pages:
            if isinstance(page, tifffile.TiffPage):
                pages.append(page)
    except DECODE_ERRORS as e:
        if not pages:  # not even the first directory: the backends will say what is wrong
            return
        raise CorruptImageError(
            f"{path}: TIFF directory {len(pages)} cannot be read ({cause_text(e)}): the file is truncated or its "
            "directories are damaged; re-copy or re-export it"
        ) from e
    extents = [
        (i, k, offset, count)
        for i, page in enumerate(pages)
        for k, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=False))
    ]
    # Every entry of every directory must have been read (tifffile skips, and only logs, an entry of an invalid type
    # or whose value lies outside the file; the backends then read e.g. a pyramid as one flat image), and the last
    # directory must end the chain (next offset 0) inside the file.
    next_ifd = 0
    if pages and not (tif.is_ndpi or tif.is_ome):  # NDPI's offsets are not plain TIFF; OME may use SubIFDs
        fh = tif.filehandle
        for i, page in enumerate(pages):
            fh.seek(page.offset)
            raw = fh.read(t.tagnosize)
            declared = struct.unpack(t.tagnoformat, raw)[0] if len(raw) == t.tagnosize else -1
            if declared != len(page.tags):
                raise CorruptImageError(
                    f"{path}: TIFF directory {i} declares {declared} entries but only {len(page.tags)} can be read: "
                    "the file's directories are damaged; re-copy or re-export it"
                )
        fh.seek(pages[-1].offset)
        raw = fh.read(t.tagnosize)
        entries = struct.unpack(t.tagnoformat, raw)[0] if len(raw) == t.tagnosize else 0
        fh.seek(pages[-1].offset + t.tagnosize + entries * t.tagsize)
        raw = fh.read(t.offsetsize)
        next_ifd = struct.unpack(t.offsetformat, raw)[0] if len(raw) == t.offsetsize else pages[-1].offset
    if next_ifd:
        raise CorruptImageError(
            f"{path}: TIFF directory {len(pages)} (at byte {next_ifd} of {size}) cannot be read: the file is "
            "truncated or its directories are damaged; re-copy or re-export it"
        )
    header = 16 if t.offsetsize == 8 else 8
    for i, k, offset, count in extents:
        if offset + count > size or (count and offset < header) or (offset and not count) or not (count or sparse_ok):
            raise CorruptImageError(
                f"{path}: tile / strip {k} of TIFF directory {i} points outside the file's data (bytes "
                f"{offset}..{offset + count} of {size}): the file is truncated or damaged; re-copy or re-export it"
            )


_DEFLATE = (8, 32946)  # TIFF Compression: Adobe deflate, deflate


class _Directory:
    """The deflate tiles (or strips) of one TIFF directory: where they are, and which were checked already."""

    def __init__(self, page: tifffile.TiffPage) -> None:
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        else:
            self.tw, self.th = self.width, int(page.rowsperstrip or self.height)
        if min(self.width, self.height, self.tw, self.th) <= 0:
            raise ValueError(f"directory of {self.width} x {self.height} pixels in tiles of {self.tw} x {self.th}")
        self.across = -(-self.width // self.tw)
        self.count = self.across * -(-self.height // self.th)
        self.inflated = int(np.prod(page.chunks)) * getattr(page.dtype, "itemsize", 8)  # a tile inflated, at most
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.lengths = np.asarray(page.databytecounts, dtype=np.int64)
        self.checked = np.zeros(len(self.offsets), dtype=bool)

    def share(self) -> None:
        """Move ``checked`` into an anonymous shared mapping: processes forked after this read and set these flags."""
        n = len(self.checked)
        flags = np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=bool, count=n)  # a mapping cannot be empty
        flags[:] = self.checked
        self.checked = flags

    def same_tiles(self, other: _Directory) -> bool:
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.lengths, other.lengths)

    def touched(self, x: int, y: int, w: int, h: int) -> list[int]:
        """Indexes of the tiles (every plane's) that the window ``(x, y, w, h)`` of this directory touches."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return []
        tiles = [
            r * self.across + c
            for r in range(y0 // self.th, -(-y1 // self.th))
            for c in range(x0 // self.tw, -(-x1 // self.tw))
        ]
        planes = len(self.offsets) // self.count if self.count else 1
        return [p * self.count + t for p in range(planes) for t in tiles if p * self.count + t < len(self.offsets)]


def inflate(raw: bytes, size: int) -> None:
    """Inflate the zlib stream ``raw`` (about ``size`` bytes inflated) to check its Adler-32, or raise zlib.error.
    libdeflate (through imagecodecs) does it in half zlib's time; a stream it refuses goes to zlib, whose word is
    final (also for a tile larger than ``size``, e.g. a damaged directory's)."""
    try:
        imagecodecs.deflate_decode(raw, out=size)
    except imagecodecs.DeflateError:
        zlib.decompress(raw)


class DeflateChecksums:
    """The Adler-32 check the backends skip.

    GDAL and libtiff stop inflating a tile once it is full, so they never reach the zlib stream's Adler-32: a
    deflate tile with bytes overwritten decodes to other pixels without a word (measured: 35 of 80 overwrites in a
    generated GeoTIFF, 67 of 80 in a deflate TIFF read through OpenSlide). :meth:`verify` inflates the raw bytes of
    the tiles a read touched (each tile once per source: about one more inflate of the data read) and raises
    CorruptImageError for a tile whose stream does not check out. Levels are matched to the TIFF's directories by
    their pixel size; directories that are not deflate-compressed are not checked (JPEG has no checksum).

    Processes reading one file can share which tiles were checked (:meth:`share` before forking, :meth:`adopt` in
    each process's own source), so that each tile is inflated once in all, not once per process. Two processes
    checking the same tile at once both inflate it, harmlessly; a tile is marked only once it checked out."""

    def __init__(self, path: Path, directories: dict[tuple[int, int], _Directory]) -> None:
        self.path, self.directories = path, directories

    @classmethod
    def of(cls, path: Path, tif: tifffile.TiffFile) -> DeflateChecksums | None:
        """The checks for the deflate directories of ``tif``, or None when it has none."""
        dirs: dict[tuple[int, int], _Directory] = {}
        with contextlib.suppress(*DECODE_ERRORS):
            for page in tif.pages:
                if not isinstance(page, tifffile.TiffPage) or page.compression not in _DEFLATE:
                    continue
                if page.subfiletype & 4:  # a transparency mask: GDAL reads it apart
                    continue
                with contextlib.suppress(*DECODE_ERRORS, TypeError):  # tags of a damaged directory: not checked
                    dirs.setdefault((int(page.imagewidth), int(page.imagelength)), _Directory(page))
        return cls(path, dirs) if dirs else None

    def share(self) -> None:
        """Keep the checked flags in memory shared with the processes forked after this call. A pickled copy (a
        spawned process's) carries the flags as they were, then its own."""
        for d in self.directories.values():
            d.share()

    def adopt(self, shared: DeflateChecksums) -> None:
        """Use ``shared``'s checked flags (see :meth:`share`) for every directory whose tiles lie at the same
        offsets with the same byte counts: the same file, even if opened by another process."""
        for key, d in self.directories.items():
            theirs = shared.directories.get(key)
            if theirs is not None and d.same_tiles(theirs):
                d.checked = theirs.checked

    def verify(self, dimensions: tuple[int, int], window: tuple[int, int, int, int], where: str) -> None:
        """Check the tiles that ``window`` ``(x, y, w, h)`` of the level of ``dimensions`` touches."""
        d = self.directories.get(dimensions)
        if d is None:
            return
        todo = [i for i in d.touched(*window) if not d.checked[i] and d.lengths[i] > 0]
        if not todo:
            return
        with open(self.path, "rb") as f:
            for i in todo:
                f.seek(int(d.offsets[i]))
                raw = f.read(int(d.lengths[i]))
                try:
                    inflate(raw, d.inflated)
                except zlib.error as e:
                    col, row = (i % d.count) % d.across, (i % d.count) // d.across
                    raise CorruptImageError(
                        f"{self.path}: cannot read {where}: its deflate tile at column {col}, row {row} of the "
                        f"{d.width} x {d.height} level does not decode ({e}); {WHAT_TO_DO}"
                    ) from e
                d.checked[i] = True
