"""densevision: dense prediction over gigapixel slides and large rasters, streamed in tiles and stitched back
in the image's coordinates."""

__version__ = "0.1.0"

from densevision.errors import DenseVisionError
from densevision.io import ImageSource, Region, open_image

__all__ = [
    "DenseVisionError",
    "ImageSource",
    "Region",
    "__version__",
    "detect_objects",
    "open_image",
    "segment_image",
    "segment_instances",
]
_API = ("segment_image", "detect_objects", "segment_instances")


def __getattr__(name: str) -> object:
    # The model-running API imports torch and the OpenMMLab stack: load it on first use, not for `densevision info`.
    if name in _API:
        import densevision.apis

        return getattr(densevision.apis, name)
    raise AttributeError(f"module 'densevision' has no attribute {name!r}")
