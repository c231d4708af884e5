"""Shape measurements of objects and regions, in physical units where the resolution is known.

Geometries come in pixels; ``linear`` ``(a, b, d, e)`` maps a pixel vector ``(dx, dy)`` to physical units
``(a dx + b dy, d dx + e dy)`` (microns from a slide's mpp: ``(mpp_x, 0, 0, mpp_y)``; metres from a raster's affine
transform in a metric CRS: its ``a, b, d, e``; ``(1, 0, 0, 1)`` and unit ``px`` otherwise). Each measurement is
taken on the geometry mapped that way, so anisotropic pixels and rotated transforms are measured right:

- ``area`` (unit²): the polygon's area, holes excluded.
- ``perimeter`` (unit): the length of every ring, holes included (for pixel outlines: along pixel edges, so a
  digital disc's perimeter is about 4/pi of the round one's).
- ``solidity``: area / area of the convex hull, in (0, 1].
- ``circularity``: ``4 pi area / perimeter²`` (QuPath's), 1 for a disc, ``pi / 4`` for a pixel square.
- ``elongation``: length / width of the minimum rotated rectangle (``shapely.oriented_envelope``), >= 1.

The descriptors (solidity, circularity, elongation) are for outlines (masks, regions); boxes get area and
perimeter only. Keys carry the unit: ``area_um2``, ``perimeter_um`` (slides), ``area_m2``, ``perimeter_m``
(rasters), ``area_px``, ``perimeter_px`` (unknown resolution); QuPath's display names for slides'
``measurements`` come from :func:`qupath_names`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from densevision.errors import ConfigError

DESCRIPTORS = ("solidity", "circularity", "elongation")
_QUPATH_UNIT = {"um": "µm", "m": "m", "px": "px"}


@dataclass(frozen=True)
class Units:
    """How pixel geometry maps to physical lengths: ``linear`` ``(a, b, d, e)`` and the length ``unit``."""

    linear: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)
    unit: str = "px"  # "um", "m" or "px"

    def __post_init__(self) -> None:
        a, b, d, e = self.linear
        if not all(math.isfinite(v) for v in self.linear) or a * e - b * d == 0:
            raise ConfigError(f"pixel-to-{self.unit} mapping {self.linear} is not invertible; check the resolution")
        if self.unit not in _QUPATH_UNIT:
            raise ConfigError(f"length unit must be one of {', '.join(_QUPATH_UNIT)}, got {self.unit!r}")

    @property
    def pixel_area(self) -> float:
        """Physical area of one pixel (unit²)."""
        a, b, d, e = self.linear
        return abs(a * e - b * d)

    @property
    def area_key(self) -> str:
        return f"area_{self.unit}2"

    @property
    def perimeter_key(self) -> str:
        return f"perimeter_{self.unit}"

    def scaled(self, factor: float) -> Units:
        """The units of pixels ``factor`` times larger (e.g. class-map pixels of a downsampled working level)."""
        a, b, d, e = self.linear
        return Units((a * factor, b * factor, d * factor, e * factor), self.unit)


def units_of(src: Any) -> Units:
    """The units of an image's level-0 pixels (anything with ``mpp``, ``transform`` and ``crs``, such as an
    ImageSource): microns from the mpp (slides), metres from the affine transform in a metric CRS (rasters), pixels
    otherwise."""
    if getattr(src, "mpp", None) is not None:
        return Units((float(src.mpp[0]), 0.0, 0.0, float(src.mpp[1])), "um")
    t, crs = getattr(src, "transform", None), getattr(src, "crs", None)
    if t is not None and crs is not None and getattr(crs, "linear_units", None) in ("metre", "meter"):
        return Units((t.a, t.b, t.d, t.e), "m")
    return Units()


def measure(
    geoms: np.ndarray | list[shapely.Geometry], units: Units, *, descriptors: bool = True
) -> dict[str, np.ndarray]:
    """Measurements of each geometry in ``geoms`` (pixels; see the module doc), as float64 arrays by key."""
    g = np.asarray(geoms, dtype=object)
    a, b, d, e = units.linear
    if units.linear != (1.0, 0.0, 0.0, 1.0):
        g = shapely.transform(g, lambda xy: xy @ np.array([[a, d], [b, e]]))
    area, perimeter = shapely.area(g), shapely.length(g)
    out = {units.area_key: area, units.perimeter_key: perimeter}
    if descriptors:
        with np.errstate(divide="ignore", invalid="ignore"):
            hull = shapely.area(shapely.convex_hull(g))
            out["solidity"] = np.where(hull > 0, area / hull, 0.0)
            out["circularity"] = np.where(perimeter > 0, 4 * np.pi * area / perimeter**2, 0.0)
            out["elongation"] = _elongation(g)
    return out


def _elongation(g: np.ndarray) -> np.ndarray:
    """Length / width of each geometry's minimum rotated rectangle (1 where it has no width)."""
    out = np.ones(len(g))
    boxes = shapely.oriented_envelope(g)
    box = np.flatnonzero(shapely.get_type_id(boxes) == shapely.GeometryType.POLYGON)
    if len(box):
        xy, index = shapely.get_coordinates(shapely.get_exterior_ring(boxes[box]), return_index=True)
        start = np.searchsorted(index, np.arange(len(box)))  # each ring's first corner, then the next two
        s1 = np.hypot(*(xy[start + 1] - xy[start]).T)
        s2 = np.hypot(*(xy[start + 2] - xy[start + 1]).T)
        lo, hi = np.minimum(s1, s2), np.maximum(s1, s2)
        out[box] = np.where(lo > 0, hi / np.where(lo > 0, lo, 1), 1.0)
    return out


def rows(measured: Mapping[str, np.ndarray]) -> list[dict[str, float]]:
    """Per object, ``{key: value}`` as Python floats (JSON-ready)."""
    keys = list(measured)
    columns = [np.asarray(measured[k], dtype=np.float64).tolist() for k in keys]
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]


def qupath_names(measurements: Mapping[str, float]) -> dict[str, float]:
    """Measurements under QuPath's display names (``Area µm^2``, ``Perimeter µm``, ``Solidity``, ...)."""
    out = {}
    for key, value in measurements.items():
        kind, _, unit = key.partition("_")
        if kind == "area":
            out[f"Area {_QUPATH_UNIT[unit[:-1]]}^2"] = value
        elif kind == "perimeter":
            out[f"Perimeter {_QUPATH_UNIT[unit]}"] = value
        else:
            out[key.capitalize()] = value
    return out
