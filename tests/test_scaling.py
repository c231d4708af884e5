"""Value scaling of non-8-bit pixels to the 0..255 range models expect."""

from __future__ import annotations

import numpy as np
import pytest

from densevision.errors import ConfigError
from densevision.io.scaling import ValueScale


def test_linear_stretch_clips_and_zeroes_nan():
    scale = ValueScale((100.0, 0.0), (300.0, 1.0))
    pixels = np.array([[[100, 0.5], [200, np.nan], [400, -1]]], dtype=np.float32)
    out = scale(pixels)
    np.testing.assert_allclose(out[0], [[0, 127.5], [127.5, 0], [255, 0]])
    assert out.dtype == np.float32


def test_percentiles_use_only_valid_pixels():
    pixels = np.zeros((10, 10, 1), dtype=np.uint16)
    pixels[..., 0] = np.arange(100).reshape(10, 10) + 1000
    valid = np.ones((10, 10), dtype=bool)
    valid[0] = False  # values 1000..1009 ignored
    scale = ValueScale.from_sample(pixels, valid, percentiles=(0, 100))
    assert scale.lo == (1010.0,) and scale.hi == (1099.0,)
    assert ValueScale.from_sample(pixels, np.zeros((10, 10), bool)).hi == (1.0,)


def test_bad_ranges():
    with pytest.raises(ConfigError, match="hi > lo"):
        ValueScale.uniform(5, 5, 3)
