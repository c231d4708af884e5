"""Pure geometry and masks for tiling: no I/O, no torch."""

from densevision.tiling.grid import Tile, TileGrid
from densevision.tiling.masks import otsu_threshold, saturation, tiles_with_content, tissue_mask

__all__ = ["Tile", "TileGrid", "otsu_threshold", "saturation", "tiles_with_content", "tissue_mask"]
