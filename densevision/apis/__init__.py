"""User-facing functions: one call per job, wiring io -> tiling -> engine -> stitch -> io."""

from densevision.apis.segment import segment_image

__all__ = ["segment_image"]
