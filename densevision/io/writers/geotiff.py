"""Tiled, compressed GeoTIFF / Cloud-Optimized GeoTIFF output for rasters, written window by window."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import rasterio
import rasterio.shutil
import tifffile
from affine import Affine
from numpy.typing import DTypeLike
from rasterio._err import CPLE_BaseError
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from densevision.errors import ConfigError, DenseVisionError, InvalidRegionError, OutputError
from densevision.io.atomic import (
    WRITE_ERRORS,
    AtomicWriter,
    as_output_error,
    disk_errors,
    disk_is_full,
    remove_quietly,
    sibling,
)
from densevision.io.decode import check_tiff_extents
from densevision.io.writers.levels import Pyramid


def check_written_tiff(path: os.PathLike[str] | str, size: tuple[int, int]) -> None:
    """Raise OutputError (DiskFullError when the disk is full) unless the TIFF GDAL wrote at ``path`` is whole: its
    first directory of ``size`` ``(width, height)`` pixels, every tile inside the file, none left out."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            found = (int(page.imagewidth), int(page.imagelength))
            if found != size:
                raise ValueError(f"its first directory is {found[0]} x {found[1]} pixels, not {size[0]} x {size[1]}")
            check_tiff_extents(Path(path), tif, sparse_ok=False)
    except (DenseVisionError, ValueError, LookupError, OSError) as e:  # tifffile: no first page is an IndexError
        raise as_output_error(None, path, f"the file GDAL wrote is incomplete: {e}") from e


def scale_transform(transform: Affine, downsample: float | tuple[float, float]) -> Affine:
    """The transform of a level whose pixels each cover ``downsample`` level-0 pixels.

    ``level_transform = transform @ Affine.scale(sx, sy)`` (``@`` is affine 3's spelling of ``*``): the top-left
    corner of pixel ``(0, 0)`` keeps its CRS position and each pixel grows by ``(sx, sy)``. ``downsample`` may be
    non-integer; for a level of ``w x h`` pixels cut from a level 0 of ``W x H``, pass ``(W / w, H / h)`` (the two
    ratios differ when sizes were rounded). A single number scales both axes.
    """
    sx, sy = (downsample, downsample) if isinstance(downsample, (int, float)) else downsample
    if not (sx > 0 and sy > 0):
        raise ConfigError(f"downsample must be positive, got {downsample!r}")
    return transform @ Affine.scale(sx, sy)


def _default_resampling(dtype: np.dtype) -> str:
    # Class indices must stay class indices (majority of the 2x2 block); probabilities are averaged.
    return "average" if np.issubdtype(dtype, np.floating) else "mode"


def cast_window(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``array`` as ``dtype``, refusing casts that would change values (float -> int, out-of-range integers)."""
    if array.dtype == dtype or np.can_cast(array.dtype, dtype, "safe"):
        return array.astype(dtype, copy=False)
    if np.issubdtype(array.dtype, np.integer) and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(dtype)
        raise InvalidRegionError(
            f"{where}: values {array.min()}..{array.max()} do not fit the output dtype {dtype}; "
            "choose a wider dtype for the writer"
        )
    if np.issubdtype(array.dtype, np.floating) and np.issubdtype(dtype, np.floating):
        return array.astype(dtype)
    raise InvalidRegionError(
        f"{where}: cannot store {array.dtype} values in a {dtype} output without changing them; "
        f"convert first (e.g. argmax to class indices) or create the writer with dtype={array.dtype}"
    )


_threads_started_by: int | None = None  # the process that first gave GDAL's thread pool work


def compression_threads() -> str:
    """GDAL's ``NUM_THREADS`` for compressing: all CPUs, but one in a process forked from one whose GDAL thread pool
    was started (the pool's threads are not in the fork: work given to it would never be done)."""
    global _threads_started_by
    if _threads_started_by is None:
        _threads_started_by = os.getpid()
    return "ALL_CPUS" if _threads_started_by == os.getpid() else "1"


class GeoTiffWriter(AtomicWriter):
    """A tiled, deflate-compressed GeoTIFF (optionally a COG) of ``width x height`` pixels and ``count`` bands.

    Pixel ``(col, row)`` of the output maps to ``transform * (col, row)`` in ``crs`` (pixel-corner convention, as
    in rasterio); ``transform`` is the output level's own transform (see :func:`scale_transform`). With
    ``crs=None`` no CRS is written; with ``transform=None`` no geotransform either.

    Write windows with :meth:`write` (``H x W [x C]``) or :meth:`write_bands` (``C x H x W``, rasterio's order) in any
    order; every pixel never written reads as ``nodata`` (0 when None). ``interleave="band"`` stores each band's
    tiles apart (a reader of one band reads only its bytes; band-sequential windows go in without a transposing
    copy, and float bands deflate smaller and faster: see :func:`GeoTiffWriter.__init__`).
    Memory is bounded by GDAL's block cache: a window is encoded once all the 512 x 512 blocks it touches are
    complete, so write whole-width bands top to bottom (or block-aligned windows) for a compact file.

    With ``cog=True``, :meth:`close` converts the result to a Cloud-Optimized GeoTIFF with internal overviews
    (resampling "mode" for integer class maps, "average" for floats unless ``overview_resampling`` says otherwise).
    A single-band uint8 map with "mode" has its overviews built as the windows come (see :class:`_Overviews`) when
    every pixel is written exactly once; otherwise GDAL computes them at close.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        count: int = 1,
        dtype: DTypeLike = np.uint8,
        *,
        crs: Any = None,
        transform: Affine | None = None,
        nodata: float | None = None,
        colormap: Mapping[int, Sequence[int]] | None = None,
        band_descriptions: Sequence[str] | None = None,
        class_names: Mapping[int, str] | Sequence[str] | None = None,
        tags: Mapping[str, str] | None = None,
        scale: float | None = None,
        block_size: int = 512,
        compression_level: int = 6,
        cog: bool = False,
        overview_resampling: str | None = None,
        interleave: str = "pixel",
    ) -> None:
        """
        Args:
            crs: anything rasterio accepts (``CRS``, ``"EPSG:32618"``, WKT), or None for no CRS.
            colormap: ``{class index: (r, g, b[, a])}`` for a single-band uint8/uint16 class map.
            band_descriptions: one name per band (e.g. class names of a probability stack).
            class_names: ``{index: name}`` or a list; stored as the JSON dataset tag ``CLASS_NAMES``.
            tags: extra dataset metadata (``key=value`` strings).
            scale: every band's GDAL scale (stored values times ``scale`` are the real ones), or None.
            block_size: tile edge in pixels, a multiple of 16.
            interleave: ``"pixel"`` (GDAL's default: a tile holds every band) or ``"band"``. 4096^2 x 5 float32
                probabilities, deflate level 1 with the float predictor: band 66 % of the raw size at 143 MB/s of
                CPU, pixel 72 % at 127 MB/s (benchmarks/BENCHMARKS.md).
        """
        self.width, self.height, self.count = int(width), int(height), int(count)
        self.dtype = np.dtype(dtype)
        if self.width <= 0 or self.height <= 0 or self.count <= 0:
            raise ConfigError(f"output size must be positive, got {width} x {height} x {count} bands")
        if block_size <= 0 or block_size % 16:
            raise ConfigError(f"block_size must be a positive multiple of 16 (TIFF tiles), got {block_size}")
        if colormap is not None and (self.count != 1 or self.dtype not in (np.uint8, np.uint16)):
            raise ConfigError(
                f"a colormap needs a single-band uint8 or uint16 class map, not {self.count} band(s) of {self.dtype}"
            )
        if interleave not in ("pixel", "band"):
            raise ConfigError(f"interleave must be 'pixel' or 'band', got {interleave!r}")
        if band_descriptions is not None and len(band_descriptions) != self.count:
            raise ConfigError(f"got {len(band_descriptions)} band descriptions for {self.count} bands; give one each")
        super().__init__(path)
        self.crs = crs
        self.transform = transform
        self.nodata = nodata
        self.cog = cog
        self.block_size = block_size
        self.interleave = interleave
        self.compression_level = compression_level
        self.overview_resampling = overview_resampling or _default_resampling(self.dtype)
        self._cog_partial = sibling(self.path, ".cog.partial")
        profile: dict[str, Any] = {
            "driver": "GTiff",
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "dtype": self.dtype.name,
            "tiled": True,
            "blockxsize": block_size,
            "blockysize": block_size,
            "interleave": interleave,
            "compress": "deflate",
            # The COG copy re-encodes everything: stage with cheap compression.
            "zlevel": 1 if cog else compression_level,
            "predictor": 3 if np.issubdtype(self.dtype, np.floating) else 2,
            "bigtiff": "IF_SAFER",
            # Tiles are compressed on GDAL's threads (4096^2 x 5 float32, level 6: 4.9 s against 9.0 s on 2 cores).
            "num_threads": compression_threads(),
        }
        if crs is not None:
            profile["crs"] = crs
        if transform is not None:
            profile["transform"] = transform
        if nodata is not None:
            profile["nodata"] = nodata
        try:
            with warnings.catch_warnings():
                # transform=None asks for an output without georeferencing: no need to warn about it.
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(self.partial, "w", **profile)
        except RasterioError as e:
            if disk_is_full(e, self.partial):
                raise as_output_error(e, self.partial) from e
            raise OutputError(f"{self.path}: cannot create the GeoTIFF ({e}); check the path and the options") from e
        # A single-band uint8 COG (a class map) gets its overviews built as its windows come, not by GDAL at close.
        self._overviews: _Overviews | None = None
        if cog and self.count == 1 and self.dtype == np.uint8 and self.overview_resampling == "mode":
            try:
                self._overviews = _Overviews(self.path, self.width, self.height, block_size, profile)
            except BaseException:
                self.abort()
                raise
        try:
            if colormap is not None:
                self._ds.write_colormap(1, {int(k): tuple(int(c) for c in v) for k, v in colormap.items()})
            for i, desc in enumerate(band_descriptions or (), start=1):
                self._ds.set_band_description(i, desc)
            if scale is not None:
                self._ds.scales = (scale,) * self.count
            meta = dict(tags or {})
            if class_names is not None:
                names = class_names if isinstance(class_names, Mapping) else dict(enumerate(class_names))
                meta["CLASS_NAMES"] = json.dumps({str(k): v for k, v in names.items()})
            if meta:
                self._ds.update_tags(**meta)
        except BaseException:
            self.abort()
            raise

    def write(self, array: np.ndarray, x: int, y: int) -> None:
        """Write ``array`` (``H x W`` or ``H x W x C`` with ``C == count``) with its top-left at output pixel
        ``(x, y)``. The window must lie inside the output."""
        a = np.asarray(array)
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[2] != self.count:
            raise InvalidRegionError(
                f"{self.path}: window at ({x}, {y}): expected an H x W x {self.count} (or H x W for one band) array, "
                f"got shape {a.shape}"
            )
        self.write_bands(np.moveaxis(a, -1, 0), x, y)

    def write_bands(self, array: np.ndarray, x: int, y: int) -> None:
        """Write ``array``, ``C x H x W`` with ``C == count`` (rasterio's order), with its top-left at output pixel
        ``(x, y)``. The window must lie inside the output."""
        self._check_open()
        a = np.asarray(array)
        where = f"{self.path}: window at ({x}, {y})"
        if a.ndim != 3 or a.shape[0] != self.count:
            raise InvalidRegionError(f"{where}: expected a {self.count} x H x W array, got shape {a.shape}")
        h, w = a.shape[1:]
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise InvalidRegionError(
                f"{where} of {w} x {h} pixels leaves the {self.width} x {self.height} output; crop it first"
            )
        if h == 0 or w == 0:
            return
        a = cast_window(a, self.dtype, where)
        with disk_errors(self.partial):
            self._ds.write(a, window=Window(x, y, w, h))
        if self._overviews is not None:
            try:
                self._overviews.put(a[0], x, y)
            except InvalidRegionError:  # a pixel written twice: GDAL computes the overviews at close instead
                self._overviews.discard()
                self._overviews = None

    def _finish(self) -> None:
        with disk_errors(self.partial):
            self._ds.close()
        # GDAL reports a block it could not write (a full disk) in its log, not to the caller: check the file.
        check_written_tiff(self.partial, (self.width, self.height))
        if not self.cog:
            return
        source, overviews = self.partial, "AUTO"  # AUTO: GDAL computes them
        try:
            if self._overviews is not None and self._overviews.complete:
                source, overviews = self._overviews.finish(self.partial), "FORCE_USE_EXISTING"
            rasterio.shutil.copy(
                source,
                self._cog_partial,
                driver="COG",
                BLOCKSIZE=self.block_size,
                COMPRESS="DEFLATE",
                LEVEL=self.compression_level,
                PREDICTOR="YES",
                RESAMPLING=self.overview_resampling.upper(),
                BIGTIFF="IF_SAFER",
                NUM_THREADS=compression_threads(),
                OVERVIEWS=overviews,
            )
        except (RasterioError, CPLE_BaseError) as e:
            if disk_is_full(e, self._cog_partial):
                raise as_output_error(e, self._cog_partial) from e
            raise OutputError(f"{self.path}: converting to a Cloud-Optimized GeoTIFF failed: {e}") from e
        finally:
            if self._overviews is not None:
                self._overviews.discard()
        check_written_tiff(self._cog_partial, (self.width, self.height))
        os.replace(self._cog_partial, self.partial)

    def _discard(self) -> None:
        try:
            self._ds.close()
        finally:
            remove_quietly(self._cog_partial)
            if self._overviews is not None:
                self._overviews.discard()


class _Overviews:
    """A class map's overviews for its COG, built as its windows come: each complete block is halved by ``mode``
    (:class:`~densevision.io.writers.levels.Pyramid`) into a staging GeoTIFF per overview level beside the output.
    At close a VRT of the staged class map names them as its overviews, and the COG driver copies them
    (``OVERVIEWS=FORCE_USE_EXISTING``) instead of computing them: 8192^2 class map, the COG copy 0.69 s -> 0.20 s;
    16384^2 2.62 s -> 0.80 s (benchmarks/BENCHMARKS.md). Needs every pixel written exactly once (else GDAL computes
    them, as before)."""

    def __init__(self, path: Path, width: int, height: int, block_size: int, profile: dict[str, Any]) -> None:
        self.pyramid = Pyramid(width, height, 1, block_size, "mode", self._put)
        self.paths = [sibling(path, f".ov{i}.partial") for i in range(1, len(self.pyramid.dimensions))]
        self.vrt = sibling(path, ".vrt.partial")
        plain = {k: v for k, v in profile.items() if k not in ("crs", "transform")}  # the VRT places them
        self.datasets = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            for p, (w, h) in zip(self.paths, self.pyramid.dimensions[1:], strict=True):
                self.datasets.append(rasterio.open(p, "w", **{**plain, "width": w, "height": h}))

    @property
    def complete(self) -> bool:
        return self.pyramid.complete

    def put(self, a: np.ndarray, x: int, y: int) -> None:
        """Level-0 pixels ``h x w`` at ``(x, y)``."""
        self.pyramid.put(a[..., None], x, y)

    def _put(self, level: int, tx: int, ty: int, tile: np.ndarray) -> None:
        if level == 0:  # level 0 is the output's own, written by GDAL
            return
        lv = self.pyramid.levels[level]
        t = lv.tile_size
        h, w = lv.extent(tx, ty)
        with disk_errors(self.paths[level - 1]):
            self.datasets[level - 1].write(tile[:h, :w, 0], 1, window=Window(tx * t, ty * t, w, h))

    def finish(self, staged: Path) -> Path:
        """Close the levels; write and return a VRT of ``staged`` (the level-0 GeoTIFF: its georeferencing, colour
        table, nodata and metadata) whose band has the levels as overviews."""
        for p, ds in zip(self.paths, self.datasets, strict=True):
            with disk_errors(p):
                ds.close()
            check_written_tiff(p, (ds.width, ds.height))
        rasterio.shutil.copy(staged, self.vrt, driver="VRT")
        tree = ElementTree.parse(self.vrt)
        band = tree.getroot().find("VRTRasterBand")
        assert band is not None
        for p in self.paths:
            overview = ElementTree.SubElement(band, "Overview")
            ElementTree.SubElement(overview, "SourceFilename", relativeToVRT="1").text = p.name
            ElementTree.SubElement(overview, "SourceBand").text = "1"
        with disk_errors(self.vrt):
            tree.write(self.vrt)
        return self.vrt

    def discard(self) -> None:
        for ds in self.datasets:
            with contextlib.suppress(*WRITE_ERRORS):
                ds.close()
        for p in (*self.paths, self.vrt):
            remove_quietly(p)
