"""Stitching tile predictions back into whole-image results, never holding the whole image.

- :mod:`~densevision.stitch.blend`: blend windows (``crop``, ``gaussian``, ``hann``, ``constant``).
- :class:`SegmentationStitcher`: blended float32 accumulation of segmentation logits, each cell emitted as soon as
  it is final; :class:`ClassMapSink`, :func:`class_map`, :func:`probabilities` turn cells into writer input. On the
  CPU, :mod:`~densevision.stitch.fused` makes a cell's class map in one pass with its last contribution.
- :class:`DetectionMerger`: streaming NMS / NMM / greedy NMM of per-tile detections into whole objects.
- :mod:`~densevision.stitch.instances`: masks to whole-image polygons (:func:`mask_to_polygons`), pieces of one
  object joined (:func:`merge_instance_polygons`), one window per merged box to prompt it in (:func:`prompt_windows`).
"""

from densevision.stitch.blend import BLEND_MODES, blend_window, check_blend, crop_window, tile_window
from densevision.stitch.detection import DetectionMerger, Detections, DetectionSink, merge_detections
from densevision.stitch.instances import PromptWindow, mask_to_polygons, merge_instance_polygons, prompt_windows
from densevision.stitch.segmentation import (
    BlockSink,
    ClassMapSink,
    SegmentationStitcher,
    WindowWriter,
    class_map,
    probabilities,
)

__all__ = [
    "BLEND_MODES",
    "BlockSink",
    "ClassMapSink",
    "DetectionMerger",
    "DetectionSink",
    "Detections",
    "PromptWindow",
    "SegmentationStitcher",
    "WindowWriter",
    "blend_window",
    "check_blend",
    "class_map",
    "crop_window",
    "mask_to_polygons",
    "merge_detections",
    "merge_instance_polygons",
    "probabilities",
    "prompt_windows",
    "tile_window",
]
