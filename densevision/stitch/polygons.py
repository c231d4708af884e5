"""Polygons of the connected regions of a class map, traced block by block and merged across block borders.

A region is a set of pixels of one class connected by 4- or 8-neighbourhood, as rasterio / GDAL define it
(``rasterio.features.shapes(..., connectivity=4 | 8)``): under 4-connectivity pixels that touch only at a corner
are separate regions; under 8 they are one. Each region becomes one (Multi)Polygon, with its holes, in class-map
pixel coordinates with the pixel-edge convention: pixel ``(col, row)`` is the square ``[col, col + 1] x [row, row +
1]``. Vertices are integers, so every step below is exact in float64.

Why streaming is exact. Blocks come in row-major order (block rows top to bottom, each left to right, together
covering the image). In each block, the pixels of every traced class are labelled by their connected components
*within the block* (``scipy.ndimage.label``, the same connectivity) and each component is traced by GDAL
(``rasterio.features.shapes`` over the label image): a piece. Two pieces of adjacent blocks are parts of one region
exactly when a pixel of one and a pixel of the other are neighbours (across the shared edge, or under
8-connectivity also diagonally across it or across a block corner) and of the same class; so comparing the one-pixel
rows and columns along block borders, and joining pieces with a union-find, gives every region's pieces. A region's
polygon is the union of its pieces (``shapely.union_all``): pieces of adjacent blocks share their border edges
exactly (integer coordinates), so the union dissolves them without seams and equals tracing the whole map at once;
collinear vertices left on former borders are removed (``simplify(0)``, which moves nothing). GDAL's 8-connected
outlines can touch themselves at a corner (invalid as OGC polygons): such pieces go through ``make_valid`` first,
which keeps their area and makes diagonal-only joins MultiPolygons.

Memory. A region is finished when no piece of it touches the bottom row of the block row just traced (later blocks
lie below): it is handed to the sink and forgotten. Between block rows the tracer holds the bottom row's region ids
and classes (``W`` int64 + ``W`` uint8), and the pieces of the regions that reach that row: for regions of bounded
size, proportional to the width's share of them; a region as large as the image is held whole until it ends (it is
part of the output). Within a block row, also the right column of the previous block and the block being traced.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from scipy import ndimage

from densevision.errors import ConfigError, InvalidRegionError

Polygonal: TypeAlias = shapely.Polygon | shapely.MultiPolygon
CONNECTIVITY = (4, 8)
_STRUCTURE = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


class Region(NamedTuple):
    """One connected region: its class index and its outline in class-map pixels (a valid Polygon, or under
    8-connectivity a MultiPolygon when parts touch only at corners)."""

    label: int
    geometry: Polygonal


RegionSink = Callable[[list[Region]], None]


def check_connectivity(connectivity: int) -> int:
    if connectivity not in CONNECTIVITY:
        raise ConfigError(f"connectivity must be 4 or 8 (as rasterio.features.shapes defines it), got {connectivity!r}")
    return connectivity


def polygonal(geom: shapely.Geometry) -> Polygonal:
    """The areas of ``geom`` (a valid geometry) as one Polygon or MultiPolygon; lines and points are dropped."""
    if isinstance(geom, shapely.Polygon):
        return geom
    polys = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon) and not g.is_empty]
    if len(polys) == 1:
        return polys[0]
    return shapely.MultiPolygon(polys)


def valid(geoms: np.ndarray) -> np.ndarray:
    """``geoms`` (an object array) with each invalid one replaced by ``make_valid``'s areas."""
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms = geoms.copy()
        geoms[bad] = [polygonal(g) for g in shapely.make_valid(geoms[bad])]
    return geoms


def _united(pieces: list[shapely.Geometry]) -> Polygonal:
    if len(pieces) == 1:
        return polygonal(pieces[0])
    # union_all's output is valid; simplify(0) drops the collinear vertices left where block borders were.
    return polygonal(shapely.simplify(shapely.union_all(pieces), 0.0, preserve_topology=True))


def _polygons(shapes: Iterable[tuple[dict[str, Any], float]]) -> tuple[np.ndarray, np.ndarray]:
    """``rasterio.features.shapes``'s output as its values (int64) and shapely polygons, built in one call from
    all the rings' coordinates (``shapely.geometry.shape`` per polygon costs ~100 us)."""
    values, coords, ring_of, polygon_of = [], [], [], []
    ring = 0
    for k, (g, v) in enumerate(shapes):
        values.append(int(v))
        for r in g["coordinates"]:
            coords.append(r)
            ring_of.append(np.full(len(r), ring))
            polygon_of.append(k)
            ring += 1
    if not values:
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    xy = np.concatenate([np.asarray(c, dtype=np.float64) for c in coords])
    rings = shapely.linearrings(xy, indices=np.concatenate(ring_of))
    return np.array(values, np.int64), shapely.polygons(rings, indices=np.array(polygon_of))


class RegionTracer:
    """Trace the regions of a ``width x height`` class map fed as blocks in row-major order; see the module doc.

    Args:
        width, height: the class map's size in pixels.
        classes: the class indices to trace; other values (e.g. background, nodata) are never regions.
        sink: gets each batch of finished regions, in the order of their first pixel in block scan order, as soon as
            they are finished (at the end of each block row).
        connectivity: 4 or 8, as ``rasterio.features.shapes``.
    """

    def __init__(
        self, width: int, height: int, classes: Collection[int], sink: RegionSink, *, connectivity: int = 4
    ) -> None:
        if width <= 0 or height <= 0:
            raise InvalidRegionError(f"the class map must have pixels, got {width} x {height}")
        self.width, self.height, self.sink = width, height, sink
        self.connectivity = check_connectivity(connectivity)
        self.traced = np.zeros(256, dtype=bool)
        self.traced[[int(c) for c in classes if 0 <= int(c) < 256]] = True
        self.y = 0  # the top of the block row being fed
        self.x = 0  # where its next block starts
        self.row_height = 0
        self.next_id = 1  # region ids: 0 is "no region"
        self.parent: dict[int, int] = {}
        self.pieces: dict[int, list[shapely.Geometry]] = {}
        self.label: dict[int, int] = {}
        # Region ids (0: none) and classes along the bottom row of the previous block row, the bottom row of the
        # block row being fed, and the right column of the previous block of this row.
        self.above, self.above_cls = np.zeros(width, dtype=np.int64), np.zeros(width, dtype=np.uint8)
        self.below, self.below_cls = np.zeros(width, dtype=np.int64), np.zeros(width, dtype=np.uint8)
        self.left, self.left_cls = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8)
        self.emitted = 0
        self.max_open = 0  # the most regions held open at a block row's end

    @property
    def open(self) -> int:
        """Regions held now (touching blocks not yet fed)."""
        return len(self.pieces)

    def add(self, y0: int, x0: int, cmap: np.ndarray) -> None:
        """Feed the block whose top-left pixel is ``(x0, y0)``: ``cmap`` ``h x w`` uint8 class indices."""
        cmap = np.asarray(cmap)
        if cmap.dtype != np.uint8 or cmap.ndim != 2:
            raise InvalidRegionError(f"a class map block must be h x w uint8, got {cmap.dtype} {cmap.shape}")
        h, w = cmap.shape
        if self.x == 0:
            if y0 != self.y or h <= 0 or y0 + h > self.height:
                raise InvalidRegionError(
                    f"block at ({x0}, {y0}) out of order: the next block row starts at row {self.y}; feed blocks "
                    "row-major, each block row covering the width"
                )
            self.row_height = h
        if (y0, x0) != (self.y, self.x) or h != self.row_height or w <= 0 or x0 + w > self.width:
            raise InvalidRegionError(
                f"block {w} x {h} at ({x0}, {y0}) out of order: expected a block {self.row_height} rows high at "
                f"({self.x}, {self.y}); feed blocks row-major, each block row covering the width"
            )
        ids = self._trace(y0, x0, cmap)
        self._join(x0, cmap, ids)
        self.below[x0 : x0 + w], self.below_cls[x0 : x0 + w] = ids[-1], cmap[-1]
        self.left, self.left_cls = ids[:, -1].copy(), cmap[:, -1].copy()
        self.x += w
        if self.x == self.width:
            self._end_row()

    def finish(self) -> None:
        """Check that the whole map was fed (every region has been emitted by then)."""
        if self.y != self.height:
            raise InvalidRegionError(
                f"the class map was fed up to row {self.y + (self.row_height if self.x else 0)} of {self.height}"
            )

    # The block's pieces: a region id per pixel (0: not traced).
    def _trace(self, y0: int, x0: int, cmap: np.ndarray) -> np.ndarray:
        traced = self.traced[cmap]
        ids = np.zeros(cmap.shape, dtype=np.int64)
        if not traced.any():
            return ids
        local = np.zeros(cmap.shape, dtype=np.int32)
        count = 0
        for c in np.flatnonzero(np.bincount(cmap[traced], minlength=256)):
            lab, n = ndimage.label(cmap == c, structure=_STRUCTURE[self.connectivity], output=np.int32)
            np.add(local, lab + count, out=local, where=lab > 0)
            self.label.update(dict.fromkeys(range(self.next_id + count, self.next_id + count + n), int(c)))
            count += n
        first = self.next_id
        self.next_id += count
        shapes = features.shapes(
            local, mask=local > 0, connectivity=self.connectivity, transform=Affine.translation(x0, y0)
        )
        values, polys = _polygons(shapes)
        for v, g in zip(values.tolist(), valid(polys), strict=True):
            k = first + v - 1
            self.parent[k] = k
            if k in self.pieces:  # GDAL cut one 8-connected component into polygons joined at corners
                self.pieces[k] = [polygonal(shapely.make_valid(shapely.union_all([*self.pieces[k], g])))]
            else:
                self.pieces[k] = [g]
        np.add(ids, local + (first - 1), out=ids, where=local > 0)
        return ids

    def _find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _join(self, x0: int, cmap: np.ndarray, ids: np.ndarray) -> None:
        """Join the block's pieces to the pieces above it (previous block row) and to its left (previous block):
        pixels that are neighbours across the border, of the same class."""
        h, w = ids.shape
        if self.y > 0:
            top, top_cls = ids[0], cmap[0]
            up, up_cls = self.above[x0 : x0 + w], self.above_cls[x0 : x0 + w]
            self._contact(top, top_cls, up, up_cls)
            if self.connectivity == 8:  # diagonally, also across the block corners
                a = max(x0 - 1, 0)  # up-left of pixel i is above[x0 + i - 1]
                s = a - (x0 - 1)
                self._contact(top[s:], top_cls[s:], self.above[a : x0 + w - 1], self.above_cls[a : x0 + w - 1])
                b = min(x0 + w + 1, self.width)  # up-right of pixel i is above[x0 + i + 1]
                n = b - (x0 + 1)
                self._contact(top[:n], top_cls[:n], self.above[x0 + 1 : b], self.above_cls[x0 + 1 : b])
        if x0 > 0:
            col, col_cls, left, left_cls = ids[:, 0], cmap[:, 0], self.left, self.left_cls
            self._contact(col, col_cls, left, left_cls)
            if self.connectivity == 8 and h > 1:  # within the block row (its top corners are joined above)
                self._contact(col[1:], col_cls[1:], left[:-1], left_cls[:-1])  # left-up
                self._contact(col[:-1], col_cls[:-1], left[1:], left_cls[1:])  # left-down

    def _contact(self, a: np.ndarray, a_cls: np.ndarray, b: np.ndarray, b_cls: np.ndarray) -> None:
        """Join the regions ``a[i]`` and ``b[i]`` of neighbouring pixels of the same class."""
        touching = (a > 0) & (b > 0) & (a_cls == b_cls)
        if not touching.any():
            return
        pairs = np.unique(np.stack([a[touching], b[touching]], axis=1), axis=0)
        for i, j in pairs.tolist():
            ri, rj = self._find(i), self._find(j)
            if ri != rj:  # the smaller id (the earlier piece) stays the root
                lo, hi = min(ri, rj), max(ri, rj)
                self.parent[hi] = lo
                self.pieces[lo] += self.pieces.pop(hi)

    def _end_row(self) -> None:
        """Emit the regions that do not reach the bottom of this block row; keep the rest, renumbered by root."""
        self.y += self.row_height
        self.x = 0
        last = self.y == self.height
        roots = {i: self._find(i) for i in self.parent}
        bottom = np.zeros(0, dtype=np.int64) if last else np.unique(self.below[self.below > 0])
        reaching = {roots[int(i)] for i in bottom}
        done = sorted(r for r in self.pieces if r not in reaching)
        regions = [Region(self.label[r], _united(self.pieces.pop(r))) for r in done]
        self.max_open = max(self.max_open, len(self.pieces))
        self.parent = {r: r for r in self.pieces}
        self.label = {r: self.label[r] for r in self.pieces}
        if len(bottom):
            lookup = np.array([roots[int(i)] for i in bottom], dtype=np.int64)
            nz = self.below > 0
            self.below[nz] = lookup[np.searchsorted(bottom, self.below[nz])]
        self.above, self.below = self.below, self.above
        self.above_cls, self.below_cls = self.below_cls, self.above_cls
        self.emitted += len(regions)
        if regions:
            self.sink(regions)


def blocks_of(cmap: np.ndarray, rows: list[int], cols: list[int]) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(y0, x0, block)`` of a whole class map cut at the edges ``rows`` / ``cols``, row-major (for tests and small
    maps)."""
    for y0, y1 in itertools.pairwise(rows):
        for x0, x1 in itertools.pairwise(cols):
            yield y0, x0, cmap[y0:y1, x0:x1]


def trace_regions(
    cmap: np.ndarray,
    classes: Collection[int],
    *,
    rows: list[int] | None = None,
    cols: list[int] | None = None,
    connectivity: int = 4,
) -> list[Region]:
    """Every region of the classes ``classes`` of a whole ``H x W`` class map, traced in the blocks cut at ``rows``
    / ``cols`` (default: one block); the same regions whatever the blocks."""
    h, w = cmap.shape
    found: list[Region] = []
    tracer = RegionTracer(w, h, classes, found.extend, connectivity=connectivity)
    for y0, x0, block in blocks_of(cmap, rows or [0, h], cols or [0, w]):
        tracer.add(y0, x0, block)
    tracer.finish()
    return found
