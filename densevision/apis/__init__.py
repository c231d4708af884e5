"""User-facing functions: one call per job, wiring io -> tiling -> engine -> stitch -> io (:mod:`densevision.apis.job`
is the one whole-image job; :mod:`densevision.apis.settings` its typed settings).

Loaded on first use: the running APIs import torch and the OpenMMLab stack, which ``densevision info`` and the
command line's parser do not need."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from densevision.apis.cohort import run_cohort
    from densevision.apis.detect import detect_objects, segment_instances
    from densevision.apis.segment import segment_image

_WHERE = {
    "detect_objects": "detect", "segment_instances": "detect", "segment_image": "segment", "run_cohort": "cohort",
}  # fmt: skip
__all__ = ["detect_objects", "run_cohort", "segment_image", "segment_instances"]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(importlib.import_module(f"densevision.apis.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'densevision.apis' has no attribute {name!r}")
