"""Objects planted into generated images at known places, so that results can be scored: the one type every generator
(big slides and GeoTIFFs, COCO / ADE datasets, the demo's scenes) returns.

Coordinates are level-0 pixels; boxes are half-open ``[x0, x1) x [y0, y1)``. Which pixels an object covers:

- ``rect``: every pixel of the box.
- ``ellipse``: pixel ``(x, y)`` when its centre lies in the ellipse, ``((x + 0.5 - cx) / rx)^2 +
  ((y + 0.5 - cy) / ry)^2 <= 1``; the ellipse is ``ellipse = (cx, cy, rx, ry)``, or the one inscribed in the box.
- ``polygon``: the pixels COCO's rasteriser (pycocotools, as mmdet and COCO evaluation use it) fills for the
  vertices ``polygon = (x1, y1, x2, y2, ...)``, so what is annotated is exactly what is painted.
- An object with ``parts`` (a COCO crowd) covers the union of its parts.

Pixel coverage depends only on the geometry, never on the window asked for: ``mask(x, y, w, h)`` of any window
equals the same window cut from the mask of the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from densevision.errors import ConfigError

Shape = Literal["rect", "ellipse", "polygon"]
SHAPES: tuple[Shape, ...] = ("rect", "ellipse", "polygon")


@dataclass(frozen=True)
class Planted:
    """An object drawn into a generated image in one colour.

    ``x0, y0, x1, y1`` is the half-open box in level-0 pixels. As the generators return it the box is exact: the
    smallest box holding every pixel drawn (clipped to the image; objects drawn later may cover earlier ones).
    ``label`` is the object's class name. In a dataset of many images, ``file_name`` / ``image_id`` say which
    image holds it and ``iscrowd`` marks a COCO crowd annotation.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    color: tuple[int, ...] = (0, 160, 0)
    shape: Shape = "rect"
    label: str = "object"
    # For an ellipse: its centre and radii ``(cx, cy, rx, ry)`` in level-0 pixels; None: inscribed in the box.
    ellipse: tuple[float, float, float, float] | None = None
    # For a polygon: its vertices ``(x1, y1, x2, y2, ...)`` in level-0 pixels (a COCO polygon).
    polygon: tuple[float, ...] | None = None
    parts: tuple[Planted, ...] = ()
    iscrowd: bool = False
    file_name: str = ""
    image_id: int = 0

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def area(self) -> int:
        """Number of pixels drawn (before any later object covers some)."""
        return int(self.mask(self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0).sum())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; the fields of a many-image dataset only when set."""
        d: dict[str, Any] = {
            "x0": self.x0,
            "y0": self.y0,
            "x1": self.x1,
            "y1": self.y1,
            "color": list(self.color),
            "shape": self.shape,
            "label": self.label,
            "ellipse": list(self.ellipse) if self.ellipse else None,
        }
        if self.polygon is not None:
            d["polygon"] = list(self.polygon)
        if self.parts:
            d["parts"] = [p.as_dict() for p in self.parts]
        if self.iscrowd:
            d["iscrowd"] = True
        if self.file_name:
            d["file_name"], d["image_id"] = self.file_name, self.image_id
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Planted:
        """The inverse of :meth:`as_dict` (a truth file read back)."""
        return cls(
            int(d["x0"]),
            int(d["y0"]),
            int(d["x1"]),
            int(d["y1"]),
            color=tuple(int(c) for c in d.get("color", cls.color)),
            shape=d.get("shape", "rect"),
            label=str(d.get("label", "object")),
            ellipse=tuple(d["ellipse"]) if d.get("ellipse") else None,
            polygon=tuple(d["polygon"]) if d.get("polygon") else None,
            parts=tuple(cls.from_dict(p) for p in d.get("parts", ())),
            iscrowd=bool(d.get("iscrowd", False)),
            file_name=str(d.get("file_name", "")),
            image_id=int(d.get("image_id", 0)),
        )

    def mask(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``h x w`` bool: the object's pixels within the window at level-0 ``(x, y)`` of ``w x h`` pixels."""
        if self.parts:
            out = np.zeros((h, w), dtype=bool)
            for part in self.parts:
                out |= part.mask(x, y, w, h)
            return out
        out = np.zeros((h, w), dtype=bool)
        cx0, cy0, cx1, cy1 = max(x, self.x0), max(y, self.y0), min(x + w, self.x1), min(y + h, self.y1)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        if self.shape == "rect":
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = True
        elif self.shape == "ellipse":
            fx, fy = self._terms(np.arange(cx0, cx1), np.arange(cy0, cy1))
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = fy[:, None] + fx[None, :] <= 1.0
        else:
            fx0, fy0, full = self._polygon_frame()  # covers every vertex: nothing is drawn outside it
            cx0, cy0 = max(cx0, fx0), max(cy0, fy0)
            cx1, cy1 = min(cx1, fx0 + full.shape[1]), min(cy1, fy0 + full.shape[0])
            if cx1 > cx0 and cy1 > cy0:
                out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = full[cy0 - fy0 : cy1 - fy0, cx0 - fx0 : cx1 - fx0]
        return out

    def _terms(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ellipse's ``((x + 0.5 - cx) / rx)^2`` and ``((y + 0.5 - cy) / ry)^2`` for pixel columns / rows."""
        cx, cy, rx, ry = self.ellipse or (
            (self.x0 + self.x1) / 2,
            (self.y0 + self.y1) / 2,
            (self.x1 - self.x0) / 2,
            (self.y1 - self.y0) / 2,
        )
        return ((xs + 0.5 - cx) / rx) ** 2, ((ys + 0.5 - cy) / ry) ** 2

    def _polygon_frame(self) -> tuple[int, int, np.ndarray]:
        """The polygon rasterised in a frame around all its vertices (a pixel of margin): ``(x, y, mask)``.
        pycocotools scales integer shifts exactly, so the frame's pixels are those of any other frame."""
        from pycocotools import mask as mask_utils

        if not self.polygon or len(self.polygon) < 6 or len(self.polygon) % 2:
            raise ConfigError(f"polygon object {self.box}: give at least 3 vertices as (x1, y1, x2, y2, ...)")
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        fx0, fy0 = math.floor(min(xs)) - 1, math.floor(min(ys)) - 1
        fw, fh = math.ceil(max(xs)) + 2 - fx0, math.ceil(max(ys)) + 2 - fy0
        local = [v - (fx0 if i % 2 == 0 else fy0) for i, v in enumerate(self.polygon)]
        rle = mask_utils.merge(mask_utils.frPyObjects([local], fh, fw))
        return fx0, fy0, mask_utils.decode(rle).astype(bool)


# What ``plant=`` takes: Planted objects, mappings with x0, y0, x1, y1 (or box) and optional color, shape, label,
# ellipse, polygon, or plain (x0, y0, x1, y1) boxes.
PlantSpec = Planted | Mapping[str, Any] | tuple[int, int, int, int]


def scatter_objects(
    count: int,
    width: int,
    height: int,
    *,
    size: tuple[int, int] = (24, 96),
    seed: int = 0,
    shapes: Sequence[Shape] = ("rect", "ellipse"),
    colors: Sequence[tuple[int, ...]] = ((0, 160, 0), (20, 20, 220), (230, 200, 0)),
    margin: int = 8,
) -> list[Planted]:
    """``count`` non-overlapping objects of side ``size[0]..size[1]`` pixels, at seeded random places in a
    ``width x height`` image (one per cell of a grid of ``size[1] + margin`` pixel cells), ready for ``plant=``.
    ``shapes`` are ``rect`` / ``ellipse`` (inscribed in the box). The label of each is its shape."""
    lo, hi = size
    if not 0 < lo <= hi:
        raise ConfigError(f"object size must be 0 < min <= max pixels, got {size}")
    if not shapes or not set(shapes) <= {"rect", "ellipse"}:
        raise ConfigError(f"scattered shapes must be 'rect' and / or 'ellipse', got {tuple(shapes)}")
    cell = hi + margin
    nx, ny = width // cell, height // cell
    if count > nx * ny:
        raise ConfigError(
            f"{count} objects of up to {hi} px do not fit apart in {width} x {height} pixels (at most {nx * ny}); "
            "ask for fewer or smaller objects"
        )
    rng = np.random.default_rng(seed)
    out = []
    for c in rng.choice(nx * ny, size=count, replace=False):
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        x = int(c % nx) * cell + int(rng.integers(0, cell - w + 1))
        y = int(c // nx) * cell + int(rng.integers(0, cell - h + 1))
        shape = shapes[int(rng.integers(len(shapes)))]
        color = tuple(colors[int(rng.integers(len(colors)))])
        out.append(Planted(x, y, x + w, y + h, color=color, shape=shape, label=shape))
    return out


def tighten(obj: Planted, width: int, height: int) -> Planted | None:
    """``obj`` with its box shrunk to the pixels it draws in a ``width x height`` image (an ellipse or polygon
    keeps the geometry it is drawn from); None when it draws no pixel there. A polygon's box is found from its
    vertices (the box it comes with may be a placeholder)."""
    if obj.shape == "polygon" and obj.polygon and not obj.parts:
        px0, py0, px1, py1 = box_around(obj.polygon)
        obj = replace(obj, x0=px0, y0=py0, x1=px1, y1=py1)
    x0, y0, x1, y1 = max(obj.x0, 0), max(obj.y0, 0), min(obj.x1, width), min(obj.y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    geometry = obj.ellipse
    if obj.shape == "ellipse" and not obj.parts:
        if geometry is None:
            geometry = ((obj.x0 + obj.x1) / 2, (obj.y0 + obj.y1) / 2, (obj.x1 - obj.x0) / 2, (obj.y1 - obj.y0) / 2)
        xs, ys = np.arange(x0, x1), np.arange(y0, y1)
        fx, fy = obj._terms(xs, ys)
        xs, ys = xs[fx + fy.min() <= 1.0], ys[fy + fx.min() <= 1.0]
    elif obj.shape == "polygon" or obj.parts:
        m = obj.mask(x0, y0, x1 - x0, y1 - y0)
        xs, ys = x0 + np.flatnonzero(m.any(axis=0)), y0 + np.flatnonzero(m.any(axis=1))
    else:
        xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    if not len(xs) or not len(ys):
        return None
    box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
    return replace(obj, x0=box[0], y0=box[1], x1=box[2], y1=box[3], ellipse=geometry)


def box_around(polygon: Sequence[float]) -> tuple[int, int, int, int]:
    """The integer box ``(x0, y0, x1, y1)`` around every vertex of ``polygon`` (before :func:`tighten`)."""
    xs, ys = polygon[0::2], polygon[1::2]
    return math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)) + 1, math.ceil(max(ys)) + 1


def exact_objects(plant: Sequence[PlantSpec] | None, width: int, height: int, bands: int) -> list[Planted]:
    """Validate objects for a ``width x height`` image of ``bands`` bands and return them with exact boxes.

    Raises:
        ConfigError: an object is malformed, has a colour of another band count, or draws no pixel in the image.
    """
    out: list[Planted] = []
    for i, obj in enumerate(plant or ()):
        if isinstance(obj, Sequence) and not isinstance(obj, Planted) and len(obj) == 4:
            x0, y0, x1, y1 = (int(v) for v in obj)
            obj = Planted(x0, y0, x1, y1)
        elif isinstance(obj, Mapping):
            obj = _from_mapping(i, obj)
        if obj.shape not in SHAPES:
            raise ConfigError(f"plant[{i}]: shape must be one of {', '.join(SHAPES)}, got {obj.shape!r}")
        if len(obj.color) != bands or not all(0 <= int(c) <= 255 for c in obj.color):
            raise ConfigError(f"plant[{i}]: color must be {bands} values in 0..255, got {obj.color!r}")
        if obj.x1 <= obj.x0 or obj.y1 <= obj.y0:
            raise ConfigError(f"plant[{i}]: empty box {obj.box}; need x0 < x1 and y0 < y1")
        tight = tighten(replace(obj, color=tuple(int(c) for c in obj.color)), width, height)
        if tight is None:
            raise ConfigError(f"plant[{i}]: box {obj.box} draws no pixel in the {width} x {height} image")
        out.append(tight)
    return out


def _from_mapping(i: int, obj: Mapping[str, Any]) -> Planted:
    try:
        x0, y0, x1, y1 = obj["box"] if "box" in obj else (obj["x0"], obj["y0"], obj["x1"], obj["y1"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"plant[{i}] = {obj!r}: give the box as x0, y0, x1, y1 (or box=(x0, y0, x1, y1)) keys"
        ) from None
    return Planted(
        int(x0),
        int(y0),
        int(x1),
        int(y1),
        color=tuple(obj.get("color", obj.get("colour", Planted.color))),
        shape=obj.get("shape", "rect"),
        label=str(obj.get("label", "object")),
        ellipse=tuple(obj["ellipse"]) if obj.get("ellipse") else None,
        polygon=tuple(obj["polygon"]) if obj.get("polygon") else None,
    )


class PlantIndex:
    """Objects bucketed by the rows of tiles they touch, to draw each tile with the few objects it meets."""

    def __init__(self, objects: Sequence[Planted], tile: int) -> None:
        self.rows: dict[int, list[Planted]] = {}
        for obj in objects:
            for ty in range(obj.y0 // tile, (obj.y1 - 1) // tile + 1):
                self.rows.setdefault(ty, []).append(obj)

    def draw(self, pixels: np.ndarray, x: int, y: int, ty: int) -> None:
        """Draw the objects meeting the window of ``pixels`` (``H x W x C``) at level-0 ``(x, y)``."""
        h, w = pixels.shape[:2]
        for obj in self.rows.get(ty, ()):
            if obj.x0 < x + w and obj.x1 > x and obj.y0 < y + h and obj.y1 > y:
                pixels[obj.mask(x, y, w, h)] = obj.color
