"""Blend weights: how much each pixel of a ``T x T`` tile prediction counts where tiles overlap.

The stitched value of a pixel is ``sum_t w_t * l_t / sum_t w_t`` over the tiles ``t`` covering it, where
``w_t = window(pixel) * valid_t(pixel)``. Windows (all ``T x T`` float32, read-only, cached per mode and size):

- ``crop``: 1 on the tile's ``owned`` region (see :mod:`densevision.tiling.grid`), 0 on the halo. Owned regions
  partition the image, so each pixel takes exactly one tile's prediction: exact when ``overlap / 2`` covers the
  model's receptive-field radius.
- ``gaussian``: ``g(i) = exp(-(i - c)^2 / (2 s^2))`` with ``c = (T - 1) / 2`` and ``s = GAUSSIAN_SIGMA * T``
  (1/8 as in MONAI and nnU-Net); ``w[i, j] = f(i) f(j)`` with ``f = max(g / max(g), WINDOW_FLOOR)``.
- ``hann``: ``h(i) = sin^2(pi (i + 0.5) / T)`` (Hann sampled at pixel centres); ``w[i, j] = f(i) f(j)`` with
  ``f = max(h / max(h), WINDOW_FLOOR)``.
- ``constant``: all ones, plain averaging (mmsegmentation's ``slide_inference``).

The floor keeps every weight inside a tile >= ``WINDOW_FLOOR^2`` > 0, so a pixel covered only by tile borders
(an image corner) still gets a value, and float32 sums stay far from underflow. It is applied per axis, not to the
product: a floored product would give two tiles the same weight along the image's top and bottom rows (where the
other axis' factor is tiny), averaging the poor border prediction of one tile in at full strength.
"""

from __future__ import annotations

import functools

import numpy as np

from densevision.errors import ConfigError
from densevision.tiling.grid import Tile

BLEND_MODES = ("crop", "gaussian", "hann", "constant")
GAUSSIAN_SIGMA = 1 / 8
WINDOW_FLOOR = 1e-4


def check_blend(mode: str) -> str:
    """``mode`` if it is a known blend mode, else a :class:`ConfigError` naming the valid ones."""
    if mode not in BLEND_MODES:
        raise ConfigError(
            f"unknown blend mode {mode!r}; choose one of {', '.join(BLEND_MODES)} (e.g. --blend gaussian)"
        )
    return mode


def _profile(mode: str, size: int) -> np.ndarray:
    """The 1-D window of length ``size`` (float64), before normalising and flooring."""
    i = np.arange(size, dtype=np.float64)
    if mode == "gaussian":
        return np.exp(-((i - (size - 1) / 2) ** 2) / (2 * (GAUSSIAN_SIGMA * size) ** 2))
    if mode == "hann":
        return np.sin(np.pi * (i + 0.5) / size) ** 2
    return np.ones(size)


@functools.lru_cache(maxsize=32)
def blend_window(mode: str, size: int) -> np.ndarray:
    """``T x T`` float32 weights of a smooth mode (``gaussian``, ``hann``, ``constant``), max 1 (see the module
    docstring). Read-only: it is shared by every tile of that size."""
    check_blend(mode)
    if mode == "crop":
        raise ConfigError("the crop window depends on the tile's owned region: use crop_window(size, box)")
    if size < 1:
        raise ConfigError(f"tile size must be positive, got {size}")
    p = np.maximum(_profile(mode, size) / _profile(mode, size).max(), WINDOW_FLOOR)
    w = np.outer(p, p).astype(np.float32)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=64)
def crop_window(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """``T x T`` float32: 1 inside ``box = (x0, y0, x1, y1)`` (tile-local, half-open), 0 elsewhere. Read-only.

    A grid has few distinct boxes (interior, edges, corners), so the cache stays small."""
    x0, y0, x1, y1 = box
    w = np.zeros((size, size), dtype=np.float32)
    w[max(y0, 0) : y1, max(x0, 0) : x1] = 1
    w.setflags(write=False)
    return w


def tile_window(mode: str, tile: Tile) -> np.ndarray:
    """The ``T x T`` window of ``tile`` under blend ``mode`` (``crop``: 1 on its owned region)."""
    if mode == "crop":
        x0, y0, x1, y1 = tile.owned
        return crop_window(tile.width, (x0 - tile.x, y0 - tile.y, x1 - tile.x, y1 - tile.y))
    return blend_window(mode, tile.width)
