"""Stitching tile predictions back into whole-image results, band by band, never holding the whole image.

- :mod:`~densevision.stitch.blend`: blend windows (``crop``, ``gaussian``, ``hann``, ``constant``).
- :class:`SegmentationStitcher`: blended float32 accumulation of segmentation logits, emitted as finished rows;
  :class:`ClassMapSink`, :func:`class_map`, :func:`probabilities` turn those rows into writer input.
"""

from densevision.stitch.blend import BLEND_MODES, blend_window, check_blend, crop_window, tile_window
from densevision.stitch.segmentation import (
    ClassMapSink,
    RowSink,
    SegmentationStitcher,
    WindowWriter,
    class_map,
    probabilities,
)

__all__ = [
    "BLEND_MODES",
    "ClassMapSink",
    "RowSink",
    "SegmentationStitcher",
    "WindowWriter",
    "blend_window",
    "check_blend",
    "class_map",
    "crop_window",
    "probabilities",
    "tile_window",
]
