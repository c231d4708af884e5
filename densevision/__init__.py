"""densevision: dense prediction over gigapixel slides and large rasters, streamed in tiles and stitched back
in the image's coordinates."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from densevision.errors import DenseVisionError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from densevision.apis import detect_objects, run_cohort, segment_image, segment_instances
    from densevision.io import ImageSource, Region, open_image

__all__ = [
    "DenseVisionError",
    "ImageSource",
    "Region",
    "__version__",
    "detect_objects",
    "open_image",
    "run_cohort",
    "segment_image",
    "segment_instances",
]
# Loaded on first use: the readers import GDAL and OpenSlide, the model-running API torch and the OpenMMLab stack;
# `densevision info`, training and the dataset tools need neither.
_LAZY = {
    "ImageSource": "densevision.io",
    "Region": "densevision.io",
    "open_image": "densevision.io",
    "segment_image": "densevision.apis",
    "detect_objects": "densevision.apis",
    "segment_instances": "densevision.apis",
    "run_cohort": "densevision.apis",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'densevision' has no attribute {name!r}")
