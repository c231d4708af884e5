"""Instance masks as whole-image polygons, and the windows in which merged boxes are prompted for masks.

Coordinates. Image coordinates are level-0 pixels with the pixel-edge convention, as everywhere in
:mod:`densevision.stitch`: a grid (working-level) pixel ``(col, row)`` covers ``[col, col + 1) * scale`` in x,
``scale`` being level-0 pixels per grid pixel. A mask pixel ``(c, r)`` of a window at ``offset = (x, y)`` (image
coordinates) read at ``pixel`` image units per mask pixel covers
``[x + c * pixel, x + (c + 1) * pixel) x [y + r * pixel, y + (r + 1) * pixel)``.

Polygons. :func:`mask_to_polygons` traces the mask along pixel edges (GDAL's polygonize through
``rasterio.features.shapes``, 4-connected), so rasterizing the polygon back at the same grid gives the mask exactly
(unless ``simplify`` or ``min_area`` changed it). Holes are kept. Specks are dropped: a 4-connected part of fewer than
``min_area`` mask pixels goes, unless it is the mask's largest part (a small object keeps its only mask).

Prompt windows. After merging, each object is prompted exactly once, in one window that contains its whole box
(:func:`prompt_windows`): the grid tile with the most margin around the box, where some tile has at least
``min_margin`` on every side that is not the image border; otherwise a square window centred on the box, grown by
``context`` and read shrunk to the tile size (objects larger than a tile, or cut by every
tile). Windows are in grid pixels; :meth:`PromptWindow.local_boxes`, :meth:`PromptWindow.offset` and
:meth:`PromptWindow.pixel` map boxes in and masks out. Masks of one object cut into pieces by tiles (e.g. from a
detector's own mask head) are joined by :func:`merge_instance_polygons`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple, TypeAlias

import numpy as np
import shapely
from numpy.typing import ArrayLike
from rasterio import features

from densevision.errors import ConfigError, InvalidRegionError
from densevision.tiling.grid import TileGrid

Polygonal: TypeAlias = shapely.Polygon | shapely.MultiPolygon


def mask_to_polygons(
    mask: ArrayLike,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    *,
    simplify: float = 0.0,
    min_area: float = 4.0,
) -> Polygonal:
    """The outline of a boolean ``H x W`` mask as one (Multi)Polygon in image coordinates.

    Args:
        mask: ``H x W`` bool (or 0/1); pixel ``(c, r)`` maps to ``offset + scale * (c, r)`` (its top-left corner).
        offset: ``(x, y)`` image coordinates of the mask's top-left corner.
        scale: image units per mask pixel (e.g. level-0 pixels per pixel of the window the mask was predicted on).
        simplify: Douglas-Peucker tolerance in mask pixels (0 keeps the exact pixel outline; 0.5 to 1 removes the
            staircase and most vertices). Topology is preserved.
        min_area: 4-connected parts smaller than this many mask pixels are dropped, except the largest part.

    Returns an empty Polygon for an empty mask. Parts that touch only at a corner are separate polygons.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InvalidRegionError(f"a mask must be H x W, got shape {m.shape}")
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale (image units per mask pixel) must be positive, got {scale}")
    if not simplify >= 0:
        raise ConfigError(f"simplify tolerance must be >= 0 mask pixels, got {simplify}")
    m = m.astype(bool, copy=False)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return shapely.Polygon()
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.ascontiguousarray(m[r0:r1, c0:c1])  # polygonize only the mask's bounding box
    parts = [shapely.geometry.shape(g) for g, _ in features.shapes(crop.view(np.uint8), mask=crop, connectivity=4)]
    areas = np.array([p.area for p in parts])
    keep = (areas >= min_area) | (np.arange(len(parts)) == np.argmax(areas))
    multi = shapely.MultiPolygon([p for p, k in zip(parts, keep, strict=True) if k])
    if simplify > 0:
        multi = shapely.simplify(multi, simplify, preserve_topology=True)
    kept = list(shapely.get_parts(multi))
    geom: Polygonal = kept[0] if len(kept) == 1 else shapely.MultiPolygon(kept)
    corner, origin = np.array([c0, r0], dtype=np.float64), np.array(offset, dtype=np.float64)
    # offset + scale * (crop corner + c): the crop's corner is put back in the same step as the scaling.
    return shapely.transform(geom, lambda xy: (xy + corner) * scale + origin)


def merge_instance_polygons(parts: Iterable[shapely.Geometry | None]) -> Polygonal:
    """The union of the polygons of one merged object's members (e.g. the pieces of an object cut by tile borders,
    each from a different tile); ``None`` and empty members are skipped. Returns a (Multi)Polygon, empty when
    nothing is left. Pieces that abut along pixel edges of the same grid join without seams."""
    geoms = [g for g in parts if g is not None and not g.is_empty]
    if not geoms:
        return shapely.Polygon()
    union = shapely.union_all(geoms)
    # Keep only areas: members that touch along an edge or at a point can leave lines or points in the union.
    polys = [g for g in shapely.get_parts(union) if isinstance(g, shapely.Polygon) and not g.is_empty]
    if not polys:
        return shapely.Polygon()
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


class PromptWindow(NamedTuple):
    """A square window of the grid's working level in which boxes ``indices`` are prompted.

    ``x, y, w, h``: the window in grid pixels (it may reach past the image where the image is smaller than the
    window, as the grid's own tiles do; that part reads as invalid). ``shrink``: grid pixels per pixel read,
    so the window is read as ``size`` pixels (the tile size): 1 for grid tiles. ``tile``: the grid tile index when
    the window is a grid tile, else -1.
    """

    x: int
    y: int
    w: int
    h: int
    shrink: float
    indices: np.ndarray
    tile: int = -1

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the read: the window shrunk by ``shrink``."""
        return round(self.w / self.shrink), round(self.h / self.shrink)

    def offset(self, scale: float = 1.0) -> tuple[float, float]:
        """The window's top-left corner in image coordinates (``offset`` for :func:`mask_to_polygons`)."""
        return self.x * scale, self.y * scale

    def pixel(self, scale: float = 1.0) -> float:
        """Image units per pixel read (``scale`` for :func:`mask_to_polygons`)."""
        return self.shrink * scale

    def local_boxes(self, boxes: ArrayLike, scale: float = 1.0) -> np.ndarray:
        """``boxes[indices]`` (image coordinates, ``K x 4``) in the pixels read, clipped to the read's extent."""
        b = np.asarray(boxes, dtype=np.float64)[self.indices]
        local = (b - np.array(self.offset(scale) * 2)) / self.pixel(scale)
        w, h = self.size
        return np.clip(local, 0, [w, h, w, h])


def prompt_windows(
    boxes: ArrayLike,
    grid: TileGrid,
    scale: float = 1.0,
    *,
    min_margin: float = 4.0,
    context: float = 0.1,
) -> list[PromptWindow]:
    """Assign every box to exactly one window that contains it whole, for prompting SAM once per object.

    Args:
        boxes: ``K x 4`` (x0, y0, x1, y1) in image coordinates (grid pixels times ``scale``), inside the image.
        grid: the tile grid the boxes were detected on.
        scale: image units per grid pixel.
        min_margin: grid pixels that must separate a box from every side of its grid tile that is not the image
            border (room for SAM to see where the object ends; a box at a tile's inner edge may be cut there).
        context: a box that fits no grid tile gets a square window of side
            ``max(T, ceil(max((1 + 2 * context) * s, s + 2 * min_margin)) + 2)``, ``s`` being the box's longer side
            in grid pixels, centred on it and pulled inside the image; it is read at ``shrink = side / T``.

    Rule. Along each axis a tile's margin is the distance from the box to the nearer of the tile's two sides, a side
    on the image border counting as infinitely far. The box goes to the tile in the column with the most margin
    along x and the row with the most margin along y (ties: the lower one), which also has the largest smaller
    margin of the two, when that margin is at least ``min_margin``; else to its own window.
    Returns grid-tile windows in tile order, then own windows in box order; each lists its boxes in increasing order.

    Example (``dets``: merged :class:`~densevision.stitch.Detections`; the global id of an object is its index)::

        for win in prompt_windows(dets.boxes, grid, scale):
            image = read(win)  # win.size pixels: grid window (win.x, win.y, win.w, win.h) shrunk by win.shrink
            masks, quality = sam(image, win.local_boxes(dets.boxes, scale))
            for k, mask in zip(win.indices, masks):
                polygons[k] = mask_to_polygons(mask, win.offset(scale), win.pixel(scale))

    Called on each batch a streaming merger emits, a tile holding boxes of two batches is read and encoded twice.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InvalidRegionError(f"expected boxes of shape K x 4 (x0, y0, x1, y1), got {b.shape}")
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale (image units per grid pixel) must be positive, got {scale}")
    if not (min_margin >= 0 and context >= 0):
        raise ConfigError(f"min_margin and context must be >= 0, got {min_margin} and {context}")
    g = b / scale
    eps = 1e-6
    bad = ~np.isfinite(g).all(axis=1) | (g[:, 2] < g[:, 0]) | (g[:, 3] < g[:, 1])
    bad |= (g[:, :2] < -eps).any(axis=1) | (g[:, 2] > grid.width + eps) | (g[:, 3] > grid.height + eps)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise InvalidRegionError(
            f"box {k} = {b[k].tolist()} is not an (x0, y0, x1, y1) box inside the {grid.width} x {grid.height} grid "
            f"times scale={scale:g}; pass merged boxes in image coordinates"
        )
    g = np.clip(g, 0, [grid.width, grid.height, grid.width, grid.height])
    t = grid.tile
    col, mx = _best_start(g[:, 0], g[:, 2], grid.xs, t, grid.width)
    row, my = _best_start(g[:, 1], g[:, 3], grid.ys, t, grid.height)
    fits = np.minimum(mx, my) >= min_margin
    tiles = row * len(grid.xs) + col
    out: list[PromptWindow] = []
    for index in np.unique(tiles[fits]).tolist():
        r, c = divmod(index, len(grid.xs))
        members = np.flatnonzero(fits & (tiles == index))
        out.append(PromptWindow(grid.xs[c], grid.ys[r], t, t, 1.0, members, index))
    for k in np.flatnonzero(~fits).tolist():
        x0, y0, x1, y1 = g[k]
        s = max(x1 - x0, y1 - y0)
        side = max(t, math.ceil(max((1 + 2 * context) * s, s + 2 * min_margin)) + 2)
        x = _place(x0, x1, side, grid.width)
        y = _place(y0, y1, side, grid.height)
        out.append(PromptWindow(x, y, side, side, side / t, np.array([k], dtype=np.int64)))
    return out


def _best_start(lo: np.ndarray, hi: np.ndarray, starts: list[int], tile: int, length: int) -> tuple[np.ndarray, ...]:
    """Per box ``[lo, hi]`` on one axis: the tile index with the largest margin and that margin (negative when no
    tile holds the box). A side at the image border is infinitely far.

    Away from the border, ``margin(p) = min(lo - p, p + tile - hi)`` is concave in the start ``p`` and peaks at
    ``p* = (lo + hi - tile) / 2``, so the best tile is one of the two starts around ``p*``. A border side only helps
    an end tile that is one of them: if ``p* > p_1``, tile 1's margins both exceed tile 0's ``tile - hi``
    (``lo - p_1 > p_1 + tile - hi > tile - hi``), and likewise at the far end. Two candidates are enough."""
    p = np.asarray(starts, dtype=np.float64)
    n = len(p)
    i = np.searchsorted(p, (lo + hi - tile) / 2)
    cand = np.stack([np.clip(i - 1, 0, n - 1), np.clip(i, 0, n - 1)], 1)
    ps = p[cand]
    left = np.where(ps > 0, lo[:, None] - ps, np.inf)
    right = np.where(ps + tile < length, ps + tile - hi[:, None], np.inf)
    # A tile that does not hold the box has a negative margin even on a border side.
    inside = (lo[:, None] >= ps) & (hi[:, None] <= ps + tile)
    margin = np.where(inside, np.minimum(left, right), np.minimum(lo[:, None] - ps, ps + tile - hi[:, None]))
    # Candidates are in increasing index order and argmax takes the first: ties go to the lowest index.
    best = np.argmax(margin, axis=1)
    rows = np.arange(len(lo))
    return cand[rows, best], margin[rows, best]


def _place(lo: float, hi: float, side: int, length: int) -> int:
    """Start of a window of ``side`` pixels centred on ``[lo, hi]``, pulled inside ``[0, length]`` (at 0 when the
    image is shorter than the window). ``side >= hi - lo + 2`` keeps the box inside after rounding."""
    if length <= side:
        return 0
    return min(max(round((lo + hi - side) / 2), 0), length - side)
