"""Reading slides, rasters and plain images (and, later, writing results) in the image's own coordinates."""

from densevision.io.open import open_image
from densevision.io.source import ImageFacts, ImageSource, Region, Thumbnail

__all__ = ["ImageFacts", "ImageSource", "Region", "Thumbnail", "open_image"]
