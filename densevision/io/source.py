"""The ImageSource contract shared by every reader backend.

Coordinates follow OpenSlide: ``location`` is the top-left ``(x, y)`` in level-0 pixels, ``size`` is ``(w, h)``
in pixels of the requested level. Level downsamples are the real ratios of level sizes, never assumed powers of 2.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from densevision.errors import InvalidRegionError
from densevision.io.decode import DeflateChecksums, decode_errors


class Region(NamedTuple):
    """A window of pixels. ``pixels`` is ``H x W x C`` (possibly a view of band-sequential memory: make it
    contiguous where that matters); ``valid`` is ``H x W`` bool, False outside the image or where the source says
    nodata / transparent."""

    pixels: np.ndarray
    valid: np.ndarray


class Thumbnail(NamedTuple):
    """The whole image at low resolution: ``pixels`` ``h x w x C``, ``valid`` ``h x w``, and the level-0 pixels
    per thumbnail pixel ``(dx, dy)``."""

    pixels: np.ndarray
    valid: np.ndarray
    downsample: tuple[float, float]


def clip_window(
    x0: int, y0: int, w: int, h: int, width: int, height: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Intersect window ``(x0, y0, w, h)`` with an image of ``width x height``.

    Returns ``((rows, cols) in the image, (rows, cols) in the window)``, or None when they do not overlap.
    """
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))


def resize_region(region: Region, size: tuple[int, int]) -> Region:
    """Resample a region to ``size`` ``(w, h)``: area average for pixels (any dtype), nearest for validity."""
    from PIL import Image

    # Mode "F" (float32) resizes any dtype; BOX is the area average.
    bands = [
        np.asarray(Image.fromarray(region.pixels[..., b].astype(np.float32)).resize(size, Image.Resampling.BOX))
        for b in range(region.pixels.shape[-1])
    ]
    pixels = np.stack(bands, axis=-1)
    if np.issubdtype(region.pixels.dtype, np.integer):
        pixels = np.rint(pixels)
    valid = np.asarray(Image.fromarray(region.valid).resize(size, Image.Resampling.NEAREST))
    return Region(pixels.astype(region.pixels.dtype), valid)


@dataclass(frozen=True)
class ImageFacts:
    """What a backend found out about the file when opening it."""

    backend: str
    format: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    band_count: int
    dtype: np.dtype
    mpp: tuple[float, float] | None = None
    crs: Any = None  # rasterio.crs.CRS for georeferenced rasters
    transform: Any = None  # affine.Affine mapping level-0 pixel (col, row) to CRS coordinates
    nodata: float | None = None
    band_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


class ImageSource(abc.ABC):
    """A read-only multi-resolution image. Open with :func:`densevision.open_image`; use as a context manager."""

    def __init__(self, path: Path, facts: ImageFacts) -> None:
        self.path = path
        self.facts = facts
        #: the deflate tiles' Adler-32 checks (set by ``open_image`` for TIFFs that have deflate tiles)
        self.checksums: DeflateChecksums | None = None

    # Facts, OpenSlide-style names.
    @property
    def backend(self) -> str:
        return self.facts.backend

    @property
    def format(self) -> str:
        return self.facts.format

    @property
    def size(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.facts.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.facts.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.facts.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.facts.level_downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 microns per pixel ``(x, y)``, or None when unknown or implausible."""
        return self.facts.mpp

    @property
    def crs(self) -> Any:
        return self.facts.crs

    @property
    def transform(self) -> Any:
        return self.facts.transform

    @property
    def nodata(self) -> float | None:
        return self.facts.nodata

    @property
    def band_count(self) -> int:
        return self.facts.band_count

    @property
    def dtype(self) -> np.dtype:
        return self.facts.dtype

    def check_window(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> None:
        """Raise InvalidRegionError for a level that does not exist or a non-positive size."""
        if not 0 <= level < self.level_count:
            raise InvalidRegionError(
                f"{self.path}: level {level} does not exist; this image has levels 0..{self.level_count - 1}"
            )
        w, h = size
        if w <= 0 or h <= 0:
            raise InvalidRegionError(f"{self.path}: window size must be positive, got {w} x {h}")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Region:
        """Read ``size`` pixels of ``level`` starting at level-0 ``location``; outside the image is invalid.

        Raises:
            InvalidRegionError: no such level, or a size that is not positive.
            CorruptImageError: the backend cannot decode the window (the window and level named).
        """
        self.check_window(location, level, size)
        what = f"the window at {location} (level {level}, size {size})"
        with decode_errors(self.path, what, self._recover):
            region = self._read(location, level, size)
        if self.checksums is not None:
            d = self.level_downsamples[level]
            x, y = round(location[0] / d), round(location[1] / d)
            self.checksums.verify(self.level_dimensions[level], (x, y, *size), what)
        return region

    @abc.abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Region: ...

    def _recover(self) -> None:
        """Called after a failed read, before the error is raised: make the next read possible again (e.g. reopen
        a handle the backend has given up on). Nothing by default."""
        return None

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level whose downsample does not exceed ``downsample`` (at least level 0)."""
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(fits, default=0)

    def thumbnail(self, max_size: int = 1024) -> Thumbnail:
        """The whole image at low resolution, no larger than ``max_size`` on its longer side.

        Reads the closest pyramid level at or above the target resolution, then resamples to the target:
        area averaging for pixels, nearest for validity.

        Raises:
            CorruptImageError: the backend cannot decode the pixels it needs.
        """
        if max_size < 1:
            raise InvalidRegionError(f"{self.path}: thumbnail size must be positive, got {max_size}")
        what = f"the thumbnail (at most {max_size} px a side)"
        with decode_errors(self.path, what, self._recover):
            thumb = self._thumbnail(max_size)
        if self.checksums is not None:
            level = self.best_level_for_downsample(max(1.0, max(self.size) / max_size))
            self.checksums.verify(self.level_dimensions[level], (0, 0, *self.level_dimensions[level]), what)
        return thumb

    def _thumbnail(self, max_size: int) -> Thumbnail:
        W, H = self.size
        scale = max(W, H) / max_size
        out = (max(1, round(W / scale)), max(1, round(H / scale))) if scale > 1 else (W, H)
        level = self.best_level_for_downsample(max(scale, 1.0))
        region = self._read((0, 0), level, self.level_dimensions[level])
        if region.valid.shape[::-1] != out:
            region = resize_region(region, out)
        return Thumbnail(region.pixels, region.valid, (W / out[0], H / out[1]))

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the facts (what ``densevision info`` prints)."""
        f = self.facts
        return {
            "path": str(self.path),
            "backend": f.backend,
            "format": f.format,
            "size": list(self.size),
            "level_count": self.level_count,
            "levels": [
                {"dimensions": list(d), "downsample": ds}
                for d, ds in zip(f.level_dimensions, f.level_downsamples, strict=True)
            ],
            "mpp": list(f.mpp) if f.mpp else None,
            "crs": f.crs.to_string() if f.crs is not None else None,
            "transform": list(f.transform)[:6] if f.transform is not None else None,
            "nodata": f.nodata,
            "band_count": f.band_count,
            "band_names": list(f.band_names),
            "dtype": str(f.dtype),
            "notes": list(f.notes),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, size={self.size}, levels={self.level_count})"
