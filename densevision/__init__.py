"""densevision: dense prediction over gigapixel slides and large rasters, streamed in tiles and stitched back
in the image's coordinates."""

__version__ = "0.1.0"

from densevision.errors import DenseVisionError
from densevision.io import ImageSource, Region, open_image

__all__ = ["DenseVisionError", "ImageSource", "Region", "__version__", "open_image"]
