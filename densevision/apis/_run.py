"""What every whole-image run does the same way: working size, tiles with content, value scaling, the run
summary's common parts."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densevision import __version__
from densevision.engine.reader import ReadGeometry
from densevision.io import ImageSource, Thumbnail
from densevision.io.scaling import ValueScale
from densevision.tiling import TileGrid, tiles_with_content, tissue_mask

PREVIEW_SIZE = 1024


def working_size(src: ImageSource, geometry: ReadGeometry, mpp: float | None) -> tuple[int, int]:
    """``(width, height)`` of the image at the working resolution."""
    if mpp is None:
        w, h = src.level_dimensions[geometry.level]
        return int(w), int(h)
    w, h = (max(1, round(s / geometry.downsample)) for s in src.size)
    return w, h


def value_scale_for(src: ImageSource, thumb: Thumbnail, value_range: tuple[float, float] | None) -> ValueScale | None:
    """How raw values map to 0..255: the given range, the thumbnail's percentiles for non-uint8, else none."""
    if value_range is not None:
        return ValueScale.uniform(*value_range, src.band_count)
    if src.dtype != np.uint8:
        return ValueScale.from_sample(thumb.pixels, thumb.valid)
    return None


def tiles_to_run(
    src: ImageSource, grid: TileGrid, thumb: Thumbnail, geometry: ReadGeometry, skip_empty: bool
) -> np.ndarray:
    """A bool per tile of ``grid``: run it. Empty tiles (glass on slides, nodata / alpha on rasters, judged on the
    thumbnail) are skipped when ``skip_empty``."""
    if not skip_empty:
        return np.ones(len(grid), dtype=bool)
    content = tissue_mask(thumb.pixels, thumb.valid) if src.backend == "openslide" else thumb.valid
    scale = (thumb.downsample[0] / geometry.downsample, thumb.downsample[1] / geometry.downsample)
    return tiles_with_content(grid, content, scale)


def area_per_pixel(src: ImageSource, downsample: float) -> tuple[float, str] | None:
    """Physical area of one working pixel: um^2 for slides with a known mpp, m^2 for rasters in a metric CRS."""
    if src.mpp is not None:
        return src.mpp[0] * src.mpp[1] * downsample**2, "um2"
    if src.crs is not None and src.transform is not None and src.crs.linear_units in ("metre", "meter"):
        return abs(src.transform.determinant) * downsample**2, "m2"
    return None


def versions() -> dict[str, str]:
    return {"densevision": __version__, "torch": torch.__version__, "python": platform.python_version()}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON, appearing at ``path`` only when complete."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def stretch_for_display(pixels: np.ndarray) -> np.ndarray:
    """``H x W x C`` values as ``H x W x 3`` float RGB 0..255 (1st-99th percentile stretch) for previews."""
    base = pixels[..., :3].astype(np.float32)
    if base.shape[-1] < 3:
        base = np.repeat(base[..., :1], 3, axis=-1)
    lo, hi = float(np.nanpercentile(base, 1)), float(np.nanpercentile(base, 99))
    return np.clip((np.nan_to_num(base, nan=lo) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
