"""The real sample images shipped as package data (origin and license in ``SOURCES.md`` beside this file).

Found through :mod:`importlib.resources`, so they are where the installed package is, wheel or editable checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from densevision.errors import ImageNotFoundError

SLIDE = "CMU-1-Small-Region.svs"
"""Real H&E tissue, Aperio SVS, 2220 x 2967, mpp 0.499."""
GEOTIFF = "RGB.byte.tif"
"""Real Landsat 7 scene, 3 x uint8, 791 x 718, EPSG:32618, nodata 0."""
SAMPLES = (SLIDE, GEOTIFF)

__all__ = ["GEOTIFF", "SAMPLES", "SLIDE", "sample_path"]


def sample_path(name: str) -> Path:
    """The file of a shipped sample, ``SLIDE`` or ``GEOTIFF``.

    Raises:
        ImageNotFoundError: ``name`` is not a shipped sample, or the install lacks its file.
    """
    if name not in SAMPLES:
        raise ImageNotFoundError(f"{name!r} is not a shipped sample; the samples are {', '.join(SAMPLES)}")
    path = files(__name__) / name
    if not isinstance(path, Path) or not path.is_file():
        raise ImageNotFoundError(f"sample {name} is missing from the installed package ({path}); reinstall densevision")
    return path
