"""Georeferenced rasters through rasterio/GDAL (GeoTIFF, COG, JP2, ...); overviews are exposed as levels."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from densevision.errors import ConfigError, UnsupportedFormatError
from densevision.io.source import ImageFacts, ImageSource, Region, Thumbnail, clip_window

GDAL_CACHE_MB = 256


@contextlib.contextmanager
def bounded_gdal_cache(megabytes: int = GDAL_CACHE_MB) -> Iterator[None]:
    """GDAL's block cache capped for a run. Its default, 5 % of the RAM, fills up with the dirty blocks of a large
    GeoTIFF being written and is held to the end (measured: +1.1 GB peak RSS writing 8192^2 x 5 float32
    probabilities). ``GDAL_CACHEMAX`` in the environment wins."""
    if "GDAL_CACHEMAX" in os.environ:
        yield
        return
    with rasterio.Env(GDAL_CACHEMAX=megabytes):
        yield


class RasterSource(ImageSource):
    """``bands``: 1-based band indexes in the order the model wants them (e.g. ``(3, 2, 1)`` for BGR files);
    by default every band that is not alpha, in file order. NaN in float bands counts as nodata."""

    def __init__(self, path: Path, bands: Sequence[int] | None = None) -> None:
        try:
            ds = rasterio.open(path)
        except RasterioIOError as e:
            raise UnsupportedFormatError(f"{path}: GDAL cannot open this file ({e})") from e
        try:
            self._levels: dict[int, rasterio.DatasetReader] = {0: ds}
            interp = ds.colorinterp
            if bands is None:
                # Alpha bands describe validity, not content: they go to the mask, not to the model.
                self._bands = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha]
            else:
                self._bands = [int(b) for b in bands]
                if not self._bands or not all(1 <= b <= ds.count for b in self._bands):
                    raise ConfigError(f"{path}: bands {list(bands)} must be non-empty and within 1..{ds.count}")
            factors = ds.overviews(1) if ds.count else []
            dims = [(ds.width, ds.height)]
            for i in range(len(factors)):
                with rasterio.open(path, overview_level=i) as ov:
                    dims.append((ov.width, ov.height))
            notes = []
            if ds.crs is None:
                notes.append("no CRS: outputs are in pixel coordinates")
            if not ds.transform.is_rectilinear:
                notes.append("rotated or sheared transform: outputs keep it, but GeoJSON boxes become rotated polygons")
            super().__init__(
                path,
                ImageFacts(
                    backend="rasterio",
                    format=ds.driver,
                    level_dimensions=tuple(dims),
                    level_downsamples=tuple(ds.width / w for w, _ in dims),
                    band_count=len(self._bands),
                    dtype=np.dtype(ds.dtypes[self._bands[0] - 1]) if self._bands else np.dtype(np.uint8),
                    crs=ds.crs,
                    transform=ds.transform,
                    nodata=ds.nodata,
                    band_names=tuple(interp[b - 1].name for b in self._bands),
                    notes=tuple(notes),
                ),
            )
        except BaseException:
            ds.close()  # a directory that cannot be read (overviews, colour interpretation): do not leak it
            raise

    def _dataset(self, level: int) -> rasterio.DatasetReader:
        if level not in self._levels:
            self._levels[level] = rasterio.open(self.path, overview_level=level - 1)
        return self._levels[level]

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Region:
        ds = self._dataset(level)
        ds_ = self.level_downsamples[level]
        x0, y0 = round(location[0] / ds_), round(location[1] / ds_)
        w, h = size
        # Band-sequential, as GDAL gives the bands (filling an interleaved array from them costs 70 times as much,
        # 2.1 ms a 512² RGB tile); the region holds its H x W x C view, which the engine makes C x T x T for free.
        planes = np.zeros((self.band_count, h, w), dtype=self.dtype)
        pixels = np.moveaxis(planes, 0, -1)
        valid = np.zeros((h, w), dtype=bool)
        # Intersect with the image instead of a boundless read: GDAL silently shortens edge windows.
        clip = clip_window(x0, y0, w, h, ds.width, ds.height)
        if clip is None:
            return Region(pixels, valid)
        (rows, cols), dst = clip
        win = Window.from_slices(rows, cols)
        if self._bands:
            planes[(slice(None), dst[0], dst[1])] = ds.read(self._bands, window=win)
        # A file without nodata, alpha or mask is valid throughout (GDAL's mask of 255s costs 0.8 ms a 512² tile).
        all_valid = all(flags == [MaskFlags.all_valid] for flags in ds.mask_flag_enums)
        valid[dst] = True if all_valid else ds.dataset_mask(window=win) > 0
        if self.dtype.kind == "f":
            valid &= ~np.isnan(pixels).any(axis=-1)
        return Region(pixels, valid)

    def _thumbnail(self, max_size: int) -> Thumbnail:
        """GDAL's decimated read: uses overviews when present, streams the full image otherwise."""
        ds = self._levels[0]
        W, H = self.size
        scale = max(1.0, max(W, H) / max_size)
        w, h = max(1, round(W / scale)), max(1, round(H / scale))
        resampling = Resampling.average if ds.count else Resampling.nearest
        data = ds.read(self._bands, out_shape=(len(self._bands), h, w), resampling=resampling)
        mask = ds.dataset_mask(out_shape=(h, w), resampling=Resampling.nearest) > 0
        pixels = np.moveaxis(data, 0, -1)
        if self.dtype.kind == "f":
            mask &= ~np.isnan(pixels).any(axis=-1)
        return Thumbnail(pixels, mask, (W / w, H / h))

    def close(self) -> None:
        for ds in self._levels.values():
            ds.close()
        self._levels.clear()
