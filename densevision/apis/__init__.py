"""User-facing functions: one call per job, wiring io -> tiling -> engine -> stitch -> io."""

from densevision.apis.detect import detect_objects, segment_instances
from densevision.apis.segment import segment_image

__all__ = ["detect_objects", "segment_image", "segment_instances"]
