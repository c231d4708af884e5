"""Big generated GeoTIFFs: tiled, deflate-compressed, with a CRS, an affine transform and nodata, whose tiles are
mosaics of fully valid crops of a real scene (an optional nodata collar along the border), written window by window,
with objects planted at known boxes (:mod:`densevision.synthetic.planted`).

Memory is about one tile plus a source image of at most
:data:`~densevision.synthetic.mosaic.IN_MEMORY_SOURCE_PIXELS` kept in memory, never the output size. The output is
built as ``<path>.partial`` and renamed onto ``path`` only when complete; tile content depends only on ``seed``, the
tile index and the source.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioIOError
from rasterio.transform import Affine
from rasterio.windows import Window

from densevision.errors import ConfigError, OutputError, UnsupportedFormatError
from densevision.io.atomic import check_output_path, replacing
from densevision.samples import GEOTIFF, sample_path
from densevision.synthetic.mosaic import IN_MEMORY_SOURCE_PIXELS, Crops, check_size, random_turn, window_offsets
from densevision.synthetic.planted import Planted, PlantIndex, PlantSpec, exact_objects


class _RasterSource:
    """Offsets of fully valid square patches in a real raster (as large as possible, at most ``tile``), and the
    patches themselves."""

    def __init__(self, path: Path, tile: int) -> None:
        try:
            self.ds = rasterio.open(path)
        except RasterioIOError as e:
            raise UnsupportedFormatError(
                f"{path}: cannot open the source raster ({e}); pass source= a GeoTIFF "
                f"(e.g. the shipped sample {sample_path(GEOTIFF)})"
            ) from e
        ds = self.ds
        W, H = ds.width, ds.height
        small = W * H <= IN_MEMORY_SOURCE_PIXELS
        scale = 1.0 if small else max(W, H) / 2048
        shape = (max(1, round(H / scale)), max(1, round(W / scale)))
        valid = ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
        self.patch = min(tile, W, H)
        while True:
            x, y, frac = window_offsets(valid, W / shape[1], self.patch, (W, H))
            if (frac >= 1).any() or self.patch <= 16:
                break
            self.patch //= 2
        if not (frac >= 1).any():
            ds.close()
            raise ConfigError(f"{path}: the source raster has no fully valid 16 x 16 window to crop; choose another")
        self.offsets = np.stack([x[frac >= 1], y[frac >= 1]], axis=1)
        self.count, self.dtype = ds.count, np.dtype(ds.dtypes[0])
        self.crop = Crops(self._read, np.moveaxis(ds.read(), 0, -1) if small else None)

    def _read(self, x: int, y: int, size: int) -> np.ndarray:
        return np.moveaxis(self.ds.read(window=Window(x, y, size, size)), 0, -1)

    def close(self) -> None:
        self.ds.close()


def make_geotiff(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    source: str | os.PathLike[str] | None = None,
    crs: str | CRS | None = "EPSG:32618",
    pixel_size: float | tuple[float, float] | None = None,
    origin: tuple[float, float] | None = None,
    tile: int = 512,
    nodata: float | None = 0,
    collar: int = 0,
    seed: int = 0,
    overviews: bool = True,
    plant: Sequence[PlantSpec] | None = None,
) -> list[Planted]:
    """Write a ``width x height`` tiled, deflate-compressed GeoTIFF to ``path``, window by window with rasterio.

    Pixels are mosaics of seeded, rotated / flipped, fully valid patches of the real raster ``source`` (default:
    the shipped sample RGB.byte.tif; same band count and dtype); valid pixels never equal ``nodata`` in every band
    (such pixels are nudged by one). The
    georeference is ``crs`` with a north-up transform: ``pixel_size`` (map units per pixel, one number or
    ``(x, y)``; default: the source's) from the upper-left corner ``origin`` (default: the source's). ``collar``
    pixels along each border are ``nodata``. ``plant`` objects are drawn last (over the collar too), with colours
    of ``source``'s band count. ``overviews``: internal overviews 2, 4, ... (nodata-aware average) until the
    smallest fits in one tile, as a cloud-optimised GeoTIFF has.

    Memory: GDAL's block cache is capped at 64 MB while writing; otherwise about one tile.

    Returns:
        The planted objects with exact boxes in level-0 (raster) pixels, in the order given.

    Raises:
        ConfigError: bad size, tile, georeference, collar or objects. UnsupportedFormatError: ``source`` is not a
        raster. OutputError: ``path`` cannot be written.
    """
    check_size(width, height, tile)
    out = check_output_path(path)
    if collar < 0 or (collar and nodata is None):
        raise ConfigError(f"collar must be >= 0 pixels and needs a nodata value, got collar={collar}, nodata={nodata}")
    try:
        crs_obj = CRS.from_user_input(crs) if crs is not None else None
    except CRSError as e:
        raise ConfigError(f"crs {crs!r} is not a CRS rasterio understands ({e}); give e.g. 'EPSG:32618'") from e
    src = _RasterSource(Path(source) if source is not None else sample_path(GEOTIFF), tile)
    try:
        objects = exact_objects(plant, width, height, src.count)
        if nodata is not None and any(all(c == nodata for c in o.color) for o in objects):
            raise ConfigError(f"a planted colour equals nodata ({nodata}) in every band: it would read as nodata")
        if pixel_size is None:
            sx, sy = src.ds.res
        elif isinstance(pixel_size, (int, float)):
            sx = sy = pixel_size
        else:
            sx, sy = pixel_size
        if not (sx > 0 and sy > 0):
            raise ConfigError(f"pixel_size must be positive map units per pixel, got {pixel_size!r}")
        ox, oy = (src.ds.transform.c, src.ds.transform.f) if origin is None else origin
        transform = Affine(float(sx), 0.0, float(ox), 0.0, -float(sy), float(oy))
        index = PlantIndex(objects, tile)
        profile: dict[str, Any] = dict(
            driver="GTiff",
            width=width,
            height=height,
            count=src.count,
            dtype=src.dtype,
            crs=crs_obj,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=tile,
            blockysize=tile,
            compress="deflate",
            interleave="pixel",
            bigtiff="IF_SAFER",
        )
        if src.count == 3 and src.dtype == np.uint8:
            profile["photometric"] = "RGB"
        p = src.patch
        if nodata is not None:
            top = np.iinfo(src.dtype).max if src.dtype.kind in "iu" else np.inf
            nudged = nodata + 1 if nodata + 1 <= top else nodata - 1
        try:
            with (
                replacing(out) as partial,
                rasterio.Env(GDAL_CACHEMAX=64),
                rasterio.open(partial, "w", **profile) as dst,
            ):
                for ty in range(-(-height // tile)):
                    y, vh = ty * tile, min(tile, height - ty * tile)
                    for tx in range(-(-width // tile)):
                        x, vw = tx * tile, min(tile, width - tx * tile)
                        rng = np.random.default_rng([seed, 2, ty, tx])
                        pixels = np.empty((vh, vw, src.count), dtype=src.dtype)
                        for py in range(0, vh, p):
                            for px in range(0, vw, p):
                                ox_, oy_ = src.offsets[rng.integers(len(src.offsets))]
                                patch = random_turn(src.crop(int(ox_), int(oy_), p), rng)
                                pixels[py : py + p, px : px + p] = patch[: vh - py, : vw - px]
                        if nodata is not None:
                            empty = (pixels == nodata).all(axis=-1)
                            pixels[empty] = nudged
                            if collar:
                                pixels[: max(0, collar - y)] = nodata
                                pixels[max(0, height - collar - y) :] = nodata
                                pixels[:, : max(0, collar - x)] = nodata
                                pixels[:, max(0, width - collar - x) :] = nodata
                        index.draw(pixels, x, y, ty)
                        dst.write(np.moveaxis(pixels, -1, 0), window=Window(x, y, vw, vh))
                factors = [2**k for k in range(1, 32) if max(width, height) / 2 ** (k - 1) > tile]
                if overviews and factors:
                    dst.build_overviews(factors, Resampling.average)
        except (OSError, RasterioIOError) as e:
            raise OutputError(
                f"{out}: writing the synthetic GeoTIFF failed ({e}); check the path and disk space"
            ) from e
    finally:
        src.close()
    return objects
