"""Mapping pixel values of any dtype to the 0..255 range that models trained on 8-bit images expect.

``out = clip((value - lo) / (hi - lo), 0, 1) * 255`` per band, float32. uint8 input is passed through unchanged.
For uint16 / float rasters, ``lo`` and ``hi`` are either given (``--value-range LO HI``, the same for every band)
or measured once per band on the valid pixels of the low-resolution thumbnail (the 2nd and 98th percentiles),
and recorded in the run summary so the run can be repeated exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densevision.errors import ConfigError

AUTO_PERCENTILES = (2.0, 98.0)


@dataclass(frozen=True)
class ValueScale:
    """Per-band linear stretch; ``lo`` and ``hi`` have one entry per band."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lo) != len(self.hi) or not all(h > lo for lo, h in zip(self.lo, self.hi, strict=True)):
            raise ConfigError(f"value range needs hi > lo for every band, got lo={self.lo}, hi={self.hi}")

    @classmethod
    def uniform(cls, lo: float, hi: float, bands: int) -> ValueScale:
        return cls((float(lo),) * bands, (float(hi),) * bands)

    @classmethod
    def from_sample(
        cls, pixels: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float] = AUTO_PERCENTILES
    ) -> ValueScale:
        """Percentiles of each band over the valid pixels of ``pixels`` (``H x W x C``)."""
        sample = pixels[valid].astype(np.float64)
        if sample.size == 0:
            return cls.uniform(0.0, 1.0, pixels.shape[-1])
        lo, hi = np.nanpercentile(sample, percentiles, axis=0)
        hi = np.maximum(hi, lo + 1e-6)  # a constant band maps to 0 instead of dividing by zero
        return cls(tuple(float(v) for v in lo), tuple(float(v) for v in hi))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """``H x W x C`` of any dtype -> float32 in [0, 255]; NaN -> 0."""
        lo = np.asarray(self.lo, dtype=np.float32)
        hi = np.asarray(self.hi, dtype=np.float32)
        out = (pixels.astype(np.float32) - lo) / (hi - lo)
        return np.nan_to_num(np.clip(out, 0.0, 1.0) * 255.0, nan=0.0)
