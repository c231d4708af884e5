"""densevision: dense prediction over gigapixel slides and large rasters, streamed in tiles and stitched back
in the image's coordinates."""

__version__ = "0.1.0"

from densevision.errors import DenseVisionError
from densevision.io import ImageSource, Region, open_image

__all__ = ["DenseVisionError", "ImageSource", "Region", "__version__", "open_image", "segment_image"]


def __getattr__(name: str) -> object:
    # The model-running API imports torch and the OpenMMLab stack: load it on first use, not for `densevision info`.
    if name == "segment_image":
        from densevision.apis import segment_image

        return segment_image
    raise AttributeError(f"module 'densevision' has no attribute {name!r}")
