"""Whole-slide images through OpenSlide (svs, ndpi, mrxs, scn, generic tiled TIFF, DICOM, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide

from densevision.errors import CorruptImageError, UnsupportedCompressionError, UnsupportedFormatError
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


class OpenSlideSource(ImageSource):
    def __init__(self, path: Path) -> None:
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise UnsupportedFormatError(f"{path}: OpenSlide does not support this file ({e})") from e
        except openslide.OpenSlideError as e:
            if "compression" in str(e).lower():
                raise UnsupportedCompressionError(
                    f"{path}: {e}; re-encode it as a tiled pyramidal TIFF with JPEG, LZW or deflate tiles "
                    "(e.g. vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg)"
                ) from e
            raise CorruptImageError(f"{path}: OpenSlide cannot read this slide ({e}); the file may be damaged") from e
        props = self._slide.properties
        mpp, note = _mpp(props)
        notes = [note] if note else []
        bounds = [props.get(f"openslide.bounds-{k}") for k in ("x", "y", "width", "height")]
        if all(bounds):
            notes.append("non-empty region (bounds x, y, w, h): " + ", ".join(str(b) for b in bounds))
        super().__init__(
            path,
            ImageFacts(
                backend="openslide",
                format=openslide.OpenSlide.detect_format(path) or "unknown",
                level_dimensions=tuple(self._slide.level_dimensions),
                level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
                band_count=3,
                dtype=np.dtype(np.uint8),
                mpp=mpp,
                band_names=("red", "green", "blue"),
                notes=tuple(notes),
            ),
        )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Region:
        try:
            image = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as e:
            # OpenSlide errors are sticky: the handle is dead, open a fresh one for later reads.
            self._slide.close()
            self._slide = openslide.OpenSlide(self.path)
            raise CorruptImageError(
                f"{self.path}: cannot decode the window at {location} (level {level}, size {size}): {e}"
            ) from e
        # PIL drops the alpha band in C, 3x faster than numpy's strided copy; the bytearray keeps the array writable
        rgb = np.frombuffer(bytearray(image.convert("RGB").tobytes()), np.uint8).reshape(size[1], size[0], 3)
        return Region(rgb, np.asarray(image.getchannel("A")) > 0)

    def close(self) -> None:
        self._slide.close()
