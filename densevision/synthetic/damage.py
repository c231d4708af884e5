"""Damaged copies of good files, for tests of what readers do with them: cut short, or bytes overwritten at chosen
offsets; and a map of a TIFF's bytes (which tile of which directory, or the directories themselves) to choose the
offsets and to say which pixels a damage can reach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tifffile

from densevision.errors import ConfigError


def truncated(src: str | os.PathLike[str], dst: str | os.PathLike[str], length: int) -> Path:
    """Write the first ``length`` bytes of ``src`` to ``dst``."""
    data = Path(src).read_bytes()
    if not 0 <= length < len(data):
        raise ConfigError(f"length must be in 0..{len(data) - 1} to cut {src} short, got {length}")
    Path(dst).write_bytes(data[:length])
    return Path(dst)


def overwritten(src: str | os.PathLike[str], dst: str | os.PathLike[str], offset: int, junk: bytes) -> Path:
    """Write ``src`` to ``dst`` with the bytes from ``offset`` on replaced by ``junk`` (the size stays)."""
    data = bytearray(Path(src).read_bytes())
    if not 0 <= offset <= len(data) - len(junk):
        raise ConfigError(f"offset must be in 0..{len(data) - len(junk)} to overwrite {len(junk)} bytes of {src}")
    data[offset : offset + len(junk)] = junk
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


@dataclass(frozen=True)
class TileBytes:
    """The compressed bytes ``[start, stop)`` of tile (or strip) ``index`` of TIFF directory ``page``, which holds
    pixels ``[x0, x1) x [y0, y1)`` of that directory's image of ``width x height`` pixels."""

    page: int
    index: int
    start: int
    stop: int
    x0: int
    y0: int
    x1: int
    y1: int
    width: int
    height: int


def tiff_tiles(path: str | os.PathLike[str]) -> list[TileBytes]:
    """Every tile / strip of every directory of the TIFF at ``path``, in file order. Bytes not in a tile are the
    header, the directories and their tag values (tile tables, JPEG tables, GeoTIFF keys, ...)."""
    out = []
    with tifffile.TiffFile(path) as tif:
        for i, page in enumerate(tif.pages):
            assert isinstance(page, tifffile.TiffPage)
            w, h = int(page.imagewidth), int(page.imagelength)
            tw, th = (int(page.tilewidth), int(page.tilelength)) if page.is_tiled else (w, int(page.rowsperstrip or h))
            across = -(-w // tw)
            for k, (o, c) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
                col, row = k % across, k // across
                x0, y0 = col * tw, row * th
                out.append(TileBytes(i, k, int(o), int(o + c), x0, y0, min(x0 + tw, w), min(y0 + th, h), w, h))
    return sorted(out, key=lambda t: t.start)
