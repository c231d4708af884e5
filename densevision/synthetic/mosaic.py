"""What the big generated images are made of: seeded, rotated / flipped square crops of a small real image, taken
at offsets chosen on a low-resolution map of the source (tissue or glass in a slide, fully valid pixels in a raster).

A source of at most :data:`IN_MEMORY_SOURCE_PIXELS` level-0 pixels is decoded once into memory; a larger one is read
crop by crop, so a full-size real slide can serve as a source too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from densevision.errors import ConfigError

# CMU-1-Small-Region: 6.6 Mpx, 20 MB RGB.
IN_MEMORY_SOURCE_PIXELS = 2**24


class Crops:
    """Square crops of a source image at chosen level-0 offsets, from memory or read on demand."""

    def __init__(self, read: Callable[[int, int, int], np.ndarray], pixels: np.ndarray | None) -> None:
        self._read, self._pixels = read, pixels

    def __call__(self, x: int, y: int, size: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[y : y + size, x : x + size]
        return self._read(x, y, size)


def window_offsets(
    mask: np.ndarray, scale: float, size: int, source_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every ``size``-pixel window that fits in the source, placed on the grid of ``mask`` (a low-resolution
    bool map, ``scale`` level-0 pixels per mask pixel): level-0 ``x``, ``y`` and the fraction of True in it
    (a summed-area table: ``count = S[i + k, j + k] - S[i, j + k] - S[i + k, j] + S[i, j]``, ``k = size / scale``)."""
    k = max(1, round(size / scale))
    h, w = mask.shape
    if k > h or k > w:
        return np.empty(0, int), np.empty(0, int), np.empty(0)
    s = np.zeros((h + 1, w + 1), dtype=np.int64)
    s[1:, 1:] = mask.cumsum(0).cumsum(1)
    count = s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]  # (h - k + 1) x (w - k + 1)
    yy, xx = np.mgrid[: count.shape[0], : count.shape[1]]
    x = np.minimum(np.round(xx.ravel() * scale).astype(int), source_size[0] - size)
    y = np.minimum(np.round(yy.ravel() * scale).astype(int), source_size[1] - size)
    return x, y, count.ravel() / (k * k)


def random_turn(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``a`` turned by a random multiple of 90 degrees and maybe mirrored (one of the 8 symmetries of a square)."""
    a = np.rot90(a, int(rng.integers(4)))
    return a[:, ::-1] if rng.integers(2) else a


def check_size(width: int, height: int, tile: int) -> None:
    """Raises ConfigError unless the image size is positive and ``tile`` a positive multiple of 16."""
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size must be positive, got {width} x {height}")
    if tile <= 0 or tile % 16:
        raise ConfigError(f"tile size must be a positive multiple of 16 (TIFF tiles, JPEG blocks), got {tile}")
