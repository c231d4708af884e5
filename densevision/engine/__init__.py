"""The streaming runner: tiles read in worker processes, batched through a predictor, stitched and written."""

from densevision.engine.reader import ReadGeometry, TileBatch, TileDataset, read_geometry, tile_loader

__all__ = ["ReadGeometry", "TileBatch", "TileDataset", "read_geometry", "tile_loader"]
