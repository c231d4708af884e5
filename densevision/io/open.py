"""``open_image``: choose the reader by the file's content, not its extension."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import openslide
import tifffile

from densevision.errors import (
    ConfigError,
    EmptyFileError,
    ImageNotFoundError,
    NotAFileError,
    UnsupportedFormatError,
)
from densevision.io.decode import DeflateChecksums, check_tiff_extents, decode_errors
from densevision.io.plain import DEFAULT_MAX_PIXELS, PlainImageSource
from densevision.io.raster import RasterSource
from densevision.io.slide import OpenSlideSource
from densevision.io.source import ImageSource

# ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
_PILLOW_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _inspect_tiff(path: Path) -> tuple[bool, DeflateChecksums | None]:
    """Whether the TIFF at ``path`` is georeferenced, and the checks of its deflate tiles; raises CorruptImageError
    when its directories do not fit the file (see :func:`check_tiff_extents`)."""
    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # not a TIFF tifffile can parse: let the other backends decide
        return False, None
    with tif:
        try:
            tags = tif.pages.first.tags
            geotiff = any(code in tags for code in _GEOTIFF_TAGS)
        except Exception:
            return False, None
        check_tiff_extents(path, tif)
        return geotiff, DeflateChecksums.of(path, tif)


def open_image(
    path: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify_checksums: bool = True,
) -> ImageSource:
    """Open a slide, raster or plain image for windowed reading.

    Georeferenced TIFFs go to rasterio (CRS, transform, nodata, overviews); formats OpenSlide recognises go to
    OpenSlide (levels, mpp); PNG/JPEG/BMP/GIF and untiled TIFFs go to Pillow, refused above ``max_pixels``;
    anything else GDAL can open goes to rasterio. ``bands`` (1-based, in the wanted order) selects raster bands;
    slides and plain images are always RGB.

    A damaged file is refused, not decoded into other pixels: the directories of a TIFF must fit the file, and with
    ``verify_checksums`` every deflate tile a read touches is checked against its Adler-32, which GDAL and libtiff
    skip (see :class:`~densevision.io.decode.DeflateChecksums`; it costs about one more inflate of the tiles read,
    measured +75 % on bare 512 x 512 reads of a deflate GeoTIFF).

    Raises:
        ImageNotFoundError, NotAFileError, EmptyFileError, UnsupportedFormatError, CorruptImageError,
        ImageTooLargeError: each with the file named and what to do.
    """
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"{p}: no such file; check the path")
    if not p.is_file():
        raise NotAFileError(f"{p}: is a directory or special file, not an image; pass the image file itself")
    if p.stat().st_size == 0:
        raise EmptyFileError(f"{p}: the file is empty (0 bytes); re-copy or re-export it")
    with open(p, "rb") as f:
        magic = f.read(8)

    with decode_errors(p, "its header and directories"):
        is_tiff = magic.startswith(_TIFF_MAGIC)
        geotiff, checksums = _inspect_tiff(p) if is_tiff else (False, None)
        src = _open(p, magic, bands, max_pixels, geotiff)
    if verify_checksums and src.backend != "pillow":  # Pillow decodes the whole image at open
        src.checksums = checksums
    return src


def _open(p: Path, magic: bytes, bands: Sequence[int] | None, max_pixels: int, geotiff: bool) -> ImageSource:
    is_tiff = magic.startswith(_TIFF_MAGIC)
    if geotiff:
        return RasterSource(p, bands)
    try:
        vendor = openslide.OpenSlide.detect_format(p)
    except openslide.OpenSlideError:
        vendor = None
    rgb_only = vendor is not None or magic.startswith(_PILLOW_MAGIC) or is_tiff
    if rgb_only and bands is not None and list(bands) != [1, 2, 3]:
        raise ConfigError(f"{p}: band selection applies to rasters; this image is read as RGB (drop bands=)")
    if vendor is not None:
        return OpenSlideSource(p)
    if magic.startswith(_PILLOW_MAGIC) or is_tiff:
        return PlainImageSource(p, max_pixels=max_pixels)
    try:
        return RasterSource(p, bands)
    except UnsupportedFormatError:
        raise UnsupportedFormatError(
            f"{p}: not a recognised slide, raster or image (OpenSlide, GDAL and Pillow all refuse it); "
            "check that the file is complete and of a supported format"
        ) from None
