"""Typed settings of a whole-image job, grouped by what they decide, with the library's defaults and checks.

The simple entry points (``segment_image``, ``detect_objects``, ``segment_instances``) also take each field as a
keyword (``tile=``, ``mpp=``, ``blend=`` ...): :func:`gather` sorts the keywords into their groups, so every
setting is named and defaulted once, here, and the command line reads its defaults and choices from here too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from densevision.errors import ConfigError
from densevision.stitch.blend import BLEND_MODES, check_blend
from densevision.stitch.detection import MATCHES, METHODS, DetectionMerger
from densevision.stitch.polygons import CONNECTIVITY, check_connectivity
from densevision.stitch.segmentation import PROBABILITY_DTYPES
from densevision.tiling import TileGrid

# The choices, from the layers that implement them (the command line offers these).
MERGE_METHODS, MATCH_CRITERIA = METHODS, MATCHES
__all__ = [
    "AREA_UNITS", "BLEND_MODES", "CONNECTIVITY", "DETECTION_TILING", "MATCH_CRITERIA", "MERGE_METHODS",
    "PROBABILITY_DTYPES", "SEGMENTATION_TILING", "Compute", "Detection", "Model", "Reading", "Segmentation", "Tiling",
    "area_threshold", "gather", "refuse_unknown",
]  # fmt: skip

PathLike = str | os.PathLike[str]


def _positive(name: str, value: float, *, integer: bool = True, zero: bool = False) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class Model:
    """Which model: an mmseg / mmdet config (a path or a shipped config's name) and its weights."""

    config: PathLike | None = None
    checkpoint: PathLike | None = None
    cfg_options: dict[str, Any] | None = None
    trust_checkpoint: bool = False  # unpickle arbitrary objects in the checkpoint (runs its code)


@dataclass(frozen=True)
class Tiling:
    """The tile grid in working pixels: ``tile`` square windows sharing ``overlap`` pixels, ``batch_size`` per
    model call."""

    tile: int = 512
    overlap: int = 64
    batch_size: int = 4

    def check(self) -> Tiling:
        _positive("tile size (--tile)", self.tile)
        _positive("overlap (--overlap)", self.overlap, zero=True)
        _positive("batch size (--batch-size)", self.batch_size)
        if self.overlap >= self.tile:
            raise ConfigError(f"overlap {self.overlap} must be smaller than the tile size {self.tile}")
        return self


SEGMENTATION_TILING = Tiling(tile=512, overlap=64, batch_size=4)
DETECTION_TILING = Tiling(tile=1024, overlap=128, batch_size=2)


@dataclass(frozen=True)
class Reading:
    """How pixels are read: the working resolution (a pyramid ``level`` or a target ``mpp``), the raster ``bands``
    fed to the model (1-based, in model order), the stretch of non-8-bit values (``value_range``; default: per-band
    2nd-98th percentiles), whether tiles without tissue / with only nodata are skipped, and ``workers`` reader
    processes (each with its own file handle)."""

    level: int | None = None
    mpp: float | None = None
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    skip_empty: bool = True
    workers: int = 2

    def check(self) -> Reading:
        if self.level is not None and self.mpp is not None:
            raise ConfigError("give either a level (--level) or a target mpp (--mpp), not both")
        if self.level is not None:
            _positive("level (--level)", self.level, zero=True)
        if self.mpp is not None:
            _positive("mpp (--mpp)", self.mpp, integer=False)
        _positive("reader workers (--workers)", self.workers, zero=True)
        if self.value_range is not None:
            lo, hi = self.value_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"value range must be two finite numbers LO < HI, got {lo} {hi}")
        return self

    @property
    def open_options(self) -> dict[str, Any]:
        """What :func:`densevision.open_image` takes of these settings."""
        return {"bands": list(self.bands) if self.bands is not None else None}


@dataclass(frozen=True)
class Compute:
    """Where the model runs: ``device`` (auto: the first GPU when there is one), ``amp`` (bfloat16 autocast),
    ``compile`` (``torch.compile`` the predictor: slower to start, then fused kernels; outputs may differ from eager
    ones in the last bits, so it is part of what a resume must find unchanged), and whether a progress bar is
    drawn."""

    device: str = "auto"
    amp: bool = False
    progress: bool = True
    compile: bool = False


AREA_UNITS = ("px", "um2", "m2")
_AREA_SPELLINGS = {"px": "px", "pixels": "px", "um2": "um2", "µm2": "um2", "um^2": "um2", "µm^2": "um2", "um²": "um2",
                   "µm²": "um2", "m2": "m2", "m^2": "m2", "m²": "m2"}  # fmt: skip
_AREA = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(\S*)$")


def area_threshold(value: float | str) -> tuple[float, str | None]:
    """``value`` as ``(number, unit)``: a number (unit None: the measurements' unit) or text such as ``"50"``,
    ``"50um2"``, ``"2.5 m2"``, ``"100px"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), None
    else:
        found = _AREA.match(str(value).strip().lower())
        number = float(found[1]) if found and (not found[2] or found[2] in _AREA_SPELLINGS) else math.nan
        unit = _AREA_SPELLINGS[found[2]] if found and found[2] in _AREA_SPELLINGS else None
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(
            f"minimum area (--min-area) must be a number >= 0 with an optional unit px, um2 or m2 (e.g. 50um2), got "
            f"{value!r}"
        )
    return number, unit


@dataclass(frozen=True)
class Segmentation:
    """What segmentation writes: tiles combined by ``blend`` (see :mod:`densevision.stitch.blend`), and with
    ``probability_output`` the per-class probabilities beside the class map, as ``probability_dtype``: float32 or
    uint8 (``round(p * 254)``, 255 nodata, the GeoTIFF's band scale 1 / 254).

    ``polygons``: also a vector file (``.geojson``, ``.gpkg`` or ``.fgb``) with one polygon per connected region of
    each class (:mod:`densevision.stitch.polygons`), its measurements beside it (:mod:`densevision.stitch.measure`).
    ``exclude_classes``: class names that get no polygons (None: those named background, _background_, unlabeled
    or unlabelled); ``min_area``: smaller regions are dropped, a number in the measurements' unit (um² for slides
    with a resolution, m² for rasters in a metric CRS, level-0 pixels otherwise) or text with a unit (``"50um2"``,
    ``"2m2"``, ``"100px"``: px are class-map pixels); ``simplify``: topology-preserving Douglas-Peucker tolerance in
    class-map pixels (0: the exact pixel outlines; each region keeps its holes and stays valid, but is simplified
    on its own, so the shared border of two neighbouring regions may move apart by up to the tolerance);
    ``connectivity``: 4 or 8 as rasterio defines it;
    ``native_crs``: GeoJSON for rasters in the raster's CRS instead of WGS84 (GeoPackage / FlatGeobuf always keep
    it)."""

    blend: str = "gaussian"
    probability_output: bool = False
    probability_dtype: str = "float32"
    polygons: PathLike | None = None
    exclude_classes: tuple[str, ...] | None = None
    min_area: float | str = 0.0
    simplify: float = 0.0
    connectivity: int = 4
    native_crs: bool = False

    def check(self) -> Segmentation:
        check_blend(self.blend)
        if self.probability_dtype not in PROBABILITY_DTYPES:
            raise ConfigError(
                f"probability dtype (--probability-dtype) must be one of {', '.join(PROBABILITY_DTYPES)}, got "
                f"{self.probability_dtype!r}"
            )
        area_threshold(self.min_area)
        _positive("simplify tolerance (--simplify)", self.simplify, integer=False, zero=True)
        check_connectivity(self.connectivity)
        return self

    @property
    def min_area_threshold(self) -> tuple[float, str | None]:
        """``min_area`` as ``(number, unit)``; unit None: the measurements' unit."""
        return area_threshold(self.min_area)


@dataclass(frozen=True)
class Detection:
    """How detections become objects and where they go: dropped below ``score_threshold``; merged across tiles by
    ``merge`` with matches by ``match`` above ``match_threshold`` (see :mod:`densevision.stitch.detection`);
    ``overview`` adds one pass over the whole image shrunk to a tile; ``masks``: None outlines objects with the
    detector's masks when it has a mask head, True requires masks (the detector's, or SAM's with
    ``sam_checkpoint``), False boxes only. ``coco_out``: also a COCO results file; ``native_crs``: rasters keep
    their CRS instead of WGS84."""

    score_threshold: float = 0.3
    merge: str = "nmm"
    match: str = "ios"
    match_threshold: float = 0.5
    class_agnostic: bool = False
    overview: bool = False
    masks: bool | None = None
    sam_checkpoint: PathLike | None = None
    coco_out: PathLike | None = None
    native_crs: bool = False

    def check(self) -> Detection:
        DetectionMerger(TileGrid(1, 1, 1), **self.merge_options)  # the merger checks its own options
        return self

    @property
    def merge_options(self) -> dict[str, Any]:
        """The :class:`~densevision.stitch.DetectionMerger` keywords."""
        return {
            "method": self.merge,
            "match": self.match,
            "threshold": self.match_threshold,
            "class_agnostic": self.class_agnostic,
        }


_G = TypeVar("_G")


def gather(group: _G | None, default: _G, options: dict[str, Any]) -> _G:
    """``group`` (or ``default``) with the fields named in ``options`` replaced; those keys are taken out of
    ``options``, so that what is left at the end is what no group knows."""
    base = group if group is not None else default
    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    given = {k: options.pop(k) for k in list(options) if k in names}
    if "bands" in given and given["bands"] is not None:
        given["bands"] = tuple(given["bands"])
    for key in ("value_range", "exclude_classes"):
        if key in given and given[key] is not None:
            given[key] = tuple(given[key])
    return dataclasses.replace(base, **given) if given else base  # type: ignore[type-var]


def refuse_unknown(options: dict[str, Any], where: str) -> None:
    if options:
        raise TypeError(f"{where}() got unexpected keyword arguments: {', '.join(sorted(options))}")
