"""Reading slides, rasters and plain images, and writing results, in the image's own coordinates."""

from densevision.io.open import open_image
from densevision.io.source import ImageFacts, ImageSource, Region, Thumbnail
from densevision.io.writers import (
    CocoResultsWriter,
    GeoJsonWriter,
    GeoTiffWriter,
    PyramidTiffWriter,
    scale_transform,
    write_coco_results,
    write_geojson,
)

__all__ = [
    "CocoResultsWriter",
    "GeoJsonWriter",
    "GeoTiffWriter",
    "ImageFacts",
    "ImageSource",
    "PyramidTiffWriter",
    "Region",
    "Thumbnail",
    "open_image",
    "scale_transform",
    "write_coco_results",
    "write_geojson",
]
