"""Content masks computed on low-resolution thumbnails, so that empty tiles (glass, nodata) can be skipped.

Pure functions on arrays; reading the thumbnail is the caller's job (``ImageSource.thumbnail``).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import ndimage

from densevision.tiling.grid import TileGrid

# Stained tissue is coloured; glass and the white background are grey (saturation ~0.01 on CMU-1-Small-Region,
# pale eosin stroma from ~0.1). The default threshold keeps pale tissue, which Otsu (splitting the pink and
# purple modes) may drop; Otsu is used, never below this floor, when asked for.
MIN_TISSUE_SATURATION = 0.07


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 1-D ``values``: the cut that maximises the between-class variance
    ``w0 * w1 * (mu0 - mu1)^2`` of the histogram."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][np.argmax(between[:-1])])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an ``H x W x 3`` image, in [0, 1] (0 where black)."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0).astype(np.float32)


def tissue_mask(
    rgb: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    threshold: float | Literal["otsu"] = MIN_TISSUE_SATURATION,
    smooth_px: int = 2,
) -> np.ndarray:
    """Where a brightfield slide thumbnail shows tissue.

    Tissue is HSV saturation above ``threshold``; ``"otsu"`` takes
    ``max(otsu(saturation of valid pixels), MIN_TISSUE_SATURATION)``. A binary opening then closing of radius
    ``smooth_px`` thumbnail pixels removes dust and fills small gaps.

    Args:
        rgb: ``H x W x 3`` thumbnail (uint8 or any range; saturation is scale-free).
        valid: ``H x W`` bool, False where the thumbnail is outside the slide or transparent.
    Returns:
        ``H x W`` bool.
    """
    sat = saturation(rgb)
    valid = np.ones(sat.shape, dtype=bool) if valid is None else valid
    if not valid.any():
        return np.zeros(sat.shape, dtype=bool)
    cut = max(otsu_threshold(sat[valid]), MIN_TISSUE_SATURATION) if threshold == "otsu" else float(threshold)
    mask = valid & (sat > cut)
    if smooth_px > 0:
        st = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_opening(mask, st, iterations=smooth_px)
        mask = ndimage.binary_closing(mask, st, iterations=smooth_px, border_value=0)
    return mask & valid


def tiles_with_content(grid: TileGrid, mask: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """For each tile of ``grid`` (row-major), whether its window touches ``mask``.

    Args:
        mask: ``h x w`` bool content mask (tissue or valid data) at low resolution.
        scale: grid-level pixels per mask pixel ``(sx, sy)``; a footprint is widened to whole mask pixels.
    Returns:
        ``len(grid)`` bool.
    """
    sx, sy = scale
    h, w = mask.shape
    # A summed-area table answers "any content in this rectangle" in O(1) per tile.
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    keep = np.zeros(len(grid), dtype=bool)
    for t in grid:
        x0, y0 = max(0, math.floor(t.x / sx)), max(0, math.floor(t.y / sy))
        x1, y1 = min(w, math.ceil((t.x + t.width) / sx)), min(h, math.ceil((t.y + t.height) / sy))
        if x1 > x0 and y1 > y0:
            keep[t.index] = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0] > 0
    return keep
