"""The demo's images: a big generated slide and a big generated GeoTIFF built from the real sample files (those
shipped in :mod:`densevision.samples`, or a data folder laid out as ``../shared/data``), with objects planted at
known places, so that what the models find can be scored against the truth.

The class of an object decides both its shape and its colour (jittered per object); the demo's training images
come from the same generator with other seeds (:mod:`densevision.demo.models`), so the models are trained on the
distribution they are tested on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from densevision.errors import ConfigError, ImageNotFoundError
from densevision.io.atomic import write_json
from densevision.samples import GEOTIFF, SLIDE, sample_path
from densevision.synthetic.planted import Planted, Shape, scatter_objects
from densevision.synthetic.rasters import make_geotiff
from densevision.synthetic.slides import make_slide

# Bump when anything here changes the pixels or the objects generated: it is part of the model cache key.
GENERATOR_VERSION = 1

# Where a data folder (``--data DIR``, laid out as ``../shared/data``) holds the two real source images.
SLIDE_SOURCE = Path("wsi") / SLIDE
GEOTIFF_SOURCE = Path("geotiff") / GEOTIFF
Kind = Literal["slide", "geotiff"]


@dataclass(frozen=True)
class ObjectClass:
    """A planted class: its name (the model's class name), the shape drawn and the colour around which each
    object's colour is jittered."""

    name: str
    shape: Shape
    color: tuple[int, int, int]


# Saturated colours that neither H&E nor the Landsat scene has much of; one shape per class.
CLASSES: dict[Kind, tuple[ObjectClass, ...]] = {
    "slide": (ObjectClass("ellipse", "ellipse", (20, 150, 60)), ObjectClass("rect", "rect", (225, 195, 0))),
    "geotiff": (ObjectClass("rect", "rect", (235, 205, 20)), ObjectClass("ellipse", "ellipse", (230, 40, 200))),
}
COLOR_JITTER = 20


@dataclass(frozen=True)
class SceneSpec:
    """One generated image: ``width x height`` level-0 pixels, ``count`` objects of side ``object_size`` pixels,
    everything from ``seed``. GeoTIFFs get a nodata ``collar`` (pixels) that holds no object."""

    kind: Kind
    width: int
    height: int
    count: int
    object_size: tuple[int, int]
    seed: int
    collar: int = 0

    def classes(self) -> tuple[ObjectClass, ...]:
        return CLASSES[self.kind]


def class_names(kind: Kind) -> tuple[str, ...]:
    """Object class names in label order (a segmentation model puts ``background`` before them)."""
    return tuple(c.name for c in CLASSES[kind])


@dataclass(frozen=True)
class Sources:
    """The two real images the scenes are built from."""

    slide: Path
    geotiff: Path


def find_sources(data: str | os.PathLike[str] | None = None) -> Sources:
    """The real source images: the samples shipped with the package, or those of a data folder ``data``
    (``wsi/CMU-1-Small-Region.svs``, ``geotiff/RGB.byte.tif``), checked.

    Raises:
        ImageNotFoundError: a source image is missing.
    """
    if data is None:
        return Sources(sample_path(SLIDE), sample_path(GEOTIFF))
    root = Path(data)
    missing = [str(root / p) for p in (SLIDE_SOURCE, GEOTIFF_SOURCE) if not (root / p).is_file()]
    if missing:
        raise ImageNotFoundError(
            f"{root}: sample data not found (missing {', '.join(missing)}); pass --data DIR (make demo DATA=DIR) "
            "holding wsi/CMU-1-Small-Region.svs and geotiff/RGB.byte.tif, or leave --data out to use the shipped "
            "samples"
        )
    return Sources(root / SLIDE_SOURCE, root / GEOTIFF_SOURCE)


def plant(spec: SceneSpec) -> list[Planted]:
    """The objects of ``spec``: apart from each other, inside the collar, each with its class's shape and a
    jittered copy of its class's colour."""
    classes = spec.classes()
    inner_w, inner_h = spec.width - 2 * spec.collar, spec.height - 2 * spec.collar
    if inner_w <= 0 or inner_h <= 0:
        raise ConfigError(f"a {spec.collar} px collar leaves no room in a {spec.width} x {spec.height} image")
    objects = scatter_objects(
        spec.count, inner_w, inner_h, size=spec.object_size, seed=spec.seed, shapes=[c.shape for c in classes]
    )
    rng = np.random.default_rng([spec.seed, 1])
    by_shape = {c.shape: c for c in classes}
    out = []
    for obj in objects:
        cls = by_shape[obj.shape]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        color = tuple(int(v) for v in np.clip(np.array(cls.color) + jitter, 1, 255))
        c = spec.collar
        out.append(
            dataclasses.replace(
                obj, x0=obj.x0 + c, y0=obj.y0 + c, x1=obj.x1 + c, y1=obj.y1 + c, color=color, label=cls.name
            )
        )
    return out


def build(spec: SceneSpec, path: Path, sources: Sources) -> list[Planted]:
    """Write the image of ``spec`` to ``path`` from the real ``sources``; returns its objects with exact boxes."""
    objects = plant(spec)
    if spec.kind == "slide":
        return make_slide(path, spec.width, spec.height, source=sources.slide, seed=spec.seed, plant=objects)
    return make_geotiff(
        path, spec.width, spec.height, source=sources.geotiff, seed=spec.seed, collar=spec.collar, plant=objects
    )


def write_truth(path: Path, spec: SceneSpec, objects: Sequence[Planted]) -> None:
    """The planted objects as JSON (level-0 pixel boxes, half-open), beside the image they were drawn into."""
    record: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "scene": dataclasses.asdict(spec),
        "classes": list(class_names(spec.kind)),
        "objects": [o.as_dict() for o in objects],
    }
    write_json(path, record)


def read_truth(path: str | os.PathLike[str]) -> list[Planted]:
    """The planted objects of a truth file written by :func:`write_truth`."""
    return [Planted.from_dict(d) for d in json.loads(Path(path).read_text())["objects"]]
