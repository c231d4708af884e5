"""Output writers: each streams by window or feature into ``<path>.partial`` and renames it onto ``path`` only
when closed without error (a ``with`` block left by an exception leaves nothing behind).

- :class:`GeoTiffWriter` (+ :func:`scale_transform`): tiled, compressed GeoTIFF / COG for rasters.
- :class:`PyramidTiffWriter`: pyramidal tiled TIFF with microns for slides (OpenSlide generic-tiff, QuPath).
- :class:`GeoJsonWriter` / :func:`write_geojson`: detections and instances as features, in a CRS or in
  QuPath-style level-0 pixels.
- :class:`CocoResultsWriter` / :func:`write_coco_results`: COCO results JSON with RLE masks.
"""

from densevision.io.writers.coco import CocoResultsWriter, mask_to_rle, write_coco_results
from densevision.io.writers.geojson import GeoJsonWriter, write_geojson
from densevision.io.writers.geotiff import GeoTiffWriter, scale_transform
from densevision.io.writers.pyramid import PyramidTiffWriter, pyramid_dimensions

__all__ = [
    "CocoResultsWriter",
    "GeoJsonWriter",
    "GeoTiffWriter",
    "PyramidTiffWriter",
    "mask_to_rle",
    "pyramid_dimensions",
    "scale_transform",
    "write_coco_results",
    "write_geojson",
]
