"""Whole-slide images through OpenSlide (svs, ndpi, mrxs, scn, generic tiled TIFF, DICOM, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide

from densevision.errors import CorruptImageError, UnsupportedCompressionError, UnsupportedFormatError
from densevision.io.decode import WHAT_TO_DO
from densevision.io.source import ImageFacts, ImageSource, Region

# Microscopy scans lie between about 0.05 um/px (100x oil) and ~50 um/px (macro images). A value outside
# this range is a TIFF default (72 dpi = 352.8 um/px, as in boxes.tiff), not a measurement.
PLAUSIBLE_MPP = (0.01, 100.0)


def _mpp(properties: Mapping[str, str]) -> tuple[tuple[float, float] | None, str | None]:
    try:
        mpp = (
            float(properties[openslide.PROPERTY_NAME_MPP_X]),
            float(properties[openslide.PROPERTY_NAME_MPP_Y]),
        )
    except (KeyError, ValueError):
        return None, "no mpp in the file: pass --mpp to runs that need a physical resolution"
    lo, hi = PLAUSIBLE_MPP
    if not all(lo <= v <= hi for v in mpp):
        return None, f"mpp {mpp[0]:.4g} is implausible (a TIFF resolution default?): treated as unknown"
    return mpp, None


def _facts(path: Path, slide: openslide.OpenSlide) -> ImageFacts:
    """What an open slide says about itself: levels, mpp (when plausible), bounds."""
    props = slide.properties
    mpp, note = _mpp(props)
    notes = [note] if note else []
    bounds = [props.get(f"openslide.bounds-{k}") for k in ("x", "y", "width", "height")]
    if all(bounds):
        notes.append("non-empty region (bounds x, y, w, h): " + ", ".join(str(b) for b in bounds))
    return ImageFacts(
        backend="openslide",
        format=openslide.OpenSlide.detect_format(path) or "unknown",
        level_dimensions=tuple(slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        band_count=3,
        dtype=np.dtype(np.uint8),
        mpp=mpp,
        band_names=("red", "green", "blue"),
        notes=tuple(notes),
    )


class OpenSlideSource(ImageSource):
    def __init__(self, path: Path) -> None:
        try:
            slide = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise UnsupportedFormatError(f"{path}: OpenSlide does not support this file ({e})") from e
        except openslide.OpenSlideError as e:
            if "compression" in str(e).lower():
                raise UnsupportedCompressionError(
                    f"{path}: {e}; re-encode it as a tiled pyramidal TIFF with JPEG, LZW or deflate tiles "
                    "(e.g. vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg)"
                ) from e
            raise CorruptImageError(f"{path}: OpenSlide cannot read this slide ({e}); {WHAT_TO_DO}") from e
        self._slide: openslide.OpenSlide | None = slide
        try:
            super().__init__(path, _facts(path, slide))
        except BaseException:
            slide.close()  # properties that cannot be read: do not leak the handle
            raise

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Region:
        if self._slide is None:  # the last read failed: a fresh handle (failing here is reported as this read's)
            self._slide = openslide.OpenSlide(self.path)
        image = self._slide.read_region(location, level, size)
        # PIL splits the bands in C; stacked band-sequential they are what the engine feeds (C x T x T) at no further
        # cost, and the region holds their H x W x C view (1.6 ms a 512² tile against 2.9 interleaved, then planar).
        red, green, blue, alpha = image.split()
        planes = np.stack([np.asarray(red), np.asarray(green), np.asarray(blue)])
        return Region(np.moveaxis(planes, 0, -1), np.asarray(alpha) > 0)

    def _recover(self) -> None:
        # OpenSlide errors are sticky: the handle is dead; the next read opens a fresh one.
        slide, self._slide = self._slide, None
        if slide is not None:
            slide.close()

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
