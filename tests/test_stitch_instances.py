"""Masks to whole-image polygons, unions of pieces cut by tile borders, and the windows objects are prompted in."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio import features

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.instances import PromptWindow, mask_to_polygons, merge_instance_polygons, prompt_windows
from densevision.tiling.grid import TileGrid


def _rasterize(geom, shape, offset=(0.0, 0.0), scale=1.0) -> np.ndarray:
    """Pixels whose centre is inside ``geom``, on the grid ``offset + scale * (c, r)``."""
    out = features.rasterize([geom], out_shape=shape, transform=Affine(scale, 0, offset[0], 0, scale, offset[1]))
    return out.astype(bool)


def _disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 <= radius**2


def _iou(a, b) -> float:
    return a.intersection(b).area / a.union(b).area


# ---- mask_to_polygons ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "scale"), [((0.0, 0.0), 1.0), ((1234.0, 567.5), 2.5), ((-3.25, 10.0), 0.75)])
def test_round_trip_with_a_hole_an_offset_and_a_scale(offset, scale):
    m = np.zeros((37, 53), dtype=bool)
    m[4:30, 6:47] = True
    m[10:20, 15:25] = False  # a hole
    m[13:16, 18:21] = True  # an island inside the hole
    m[31:36, 40:53] = True  # a part touching the right border
    g = mask_to_polygons(m, offset, scale)
    assert g.is_valid and g.geom_type == "MultiPolygon" and len(g.geoms) == 3
    assert any(len(p.interiors) == 1 for p in g.geoms)
    assert g.area == pytest.approx(m.sum() * scale**2)
    np.testing.assert_array_equal(_rasterize(g, m.shape, offset, scale), m)
    # pixel-edge exact: the bounds are the mask's pixel edges mapped to the image
    x, y = offset
    assert g.bounds == pytest.approx((x + 6 * scale, y + 4 * scale, x + 53 * scale, y + 36 * scale))


def test_a_disc_round_trips_at_an_awkward_size():
    m = _disc((61, 47), (20.3, 33.7), 17.2)
    g = mask_to_polygons(m, (100.0, 200.0))
    assert g.geom_type == "Polygon" and g.is_valid
    np.testing.assert_array_equal(_rasterize(g, m.shape, (100.0, 200.0)), m)


def test_specks_are_dropped_below_min_area_but_a_tiny_object_keeps_its_mask():
    m = np.zeros((20, 20), dtype=bool)
    m[5:10, 5:10] = True
    m[0, 0] = m[15, 15] = m[16, 16] = True  # three one-pixel specks (the last two touch at a corner)
    m[18:20, 0:2] = True  # a 4-pixel part: kept at min_area=4
    g = mask_to_polygons(m)
    assert g.geom_type == "MultiPolygon" and sorted(p.area for p in g.geoms) == [4.0, 25.0]
    assert mask_to_polygons(m, min_area=5).area == 25.0
    every = mask_to_polygons(m, min_area=0)
    assert len(every.geoms) == 5 and every.is_valid  # corner-touching pixels are separate parts
    np.testing.assert_array_equal(_rasterize(every, m.shape), m)
    one = np.zeros((9, 9), dtype=bool)
    one[4, 4] = True
    assert mask_to_polygons(one, (10.0, 20.0), 2.0).equals(shapely.box(18, 28, 20, 30))


def test_empty_and_invalid_masks():
    assert mask_to_polygons(np.zeros((8, 8), bool)).is_empty
    assert mask_to_polygons(np.zeros((0, 5), bool)).is_empty
    u8 = np.zeros((6, 6), np.uint8)
    u8[1:3, 2:5] = 1
    assert mask_to_polygons(u8).equals(shapely.box(2, 1, 5, 3))
    with pytest.raises(InvalidRegionError, match="H x W"):
        mask_to_polygons(np.zeros((2, 4, 4), bool))
    with pytest.raises(ConfigError, match="scale"):
        mask_to_polygons(u8, scale=0)
    with pytest.raises(ConfigError, match="simplify"):
        mask_to_polygons(u8, simplify=-1)


def test_simplify_removes_the_staircase_and_stays_close():
    m = _disc((80, 80), (40, 40), 30)
    exact = mask_to_polygons(m)
    simple = mask_to_polygons(m, simplify=1.0)
    assert simple.is_valid and simple.geom_type == "Polygon"
    assert len(simple.exterior.coords) < len(exact.exterior.coords) / 2
    assert _iou(simple, exact) > 0.98


# ---- merge_instance_polygons --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 4.0, 1.7])
def test_a_disc_cut_by_a_tile_border_is_the_union_of_its_pieces(scale):
    """Grid 300 x 260, tile 128, overlap 32: one disc across the border x = 128 (in tiles 0 and 1, abutting and
    overlapping views), one across the corner of four tiles; each tile sees the disc inside its window."""
    grid = TileGrid(300, 260, 128, 32)
    full = np.zeros((260, 300), dtype=bool)
    discs = [_disc(full.shape, (120.0, 50.0), 30.0), _disc(full.shape, (112.0, 108.0), 25.0)]
    for disc in discs:
        whole = mask_to_polygons(disc, scale=scale)
        pieces = []
        for tile in grid:
            view = disc[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]
            if view.any():
                pieces.append(mask_to_polygons(view, (tile.x * scale, tile.y * scale), scale))
        assert len(pieces) >= 2
        merged = merge_instance_polygons(pieces)
        assert merged.geom_type == "Polygon" and merged.is_valid and len(merged.interiors) == 0
        assert _iou(merged, whole) > 0.99
        assert merged.area == pytest.approx(whole.area, rel=1e-9)
    # pieces that only abut (no overlap) join as well: the left and right halves of the first disc
    disc = discs[0]
    left, right = disc.copy(), disc.copy()
    left[:, 120:], right[:, :120] = False, False
    halves = [mask_to_polygons(left[:, :120], scale=scale), mask_to_polygons(right[:, 120:], (120 * scale, 0), scale)]
    merged = merge_instance_polygons(halves)
    assert merged.geom_type == "Polygon" and _iou(merged, mask_to_polygons(disc, scale=scale)) > 0.99


def test_merge_skips_empty_members_and_drops_lower_dimensional_leftovers():
    a, b = shapely.box(0, 0, 2, 2), shapely.box(2, 2, 4, 4)  # touch at one point
    m = merge_instance_polygons([a, None, shapely.Polygon(), b])
    assert m.geom_type == "MultiPolygon" and m.area == 8
    assert merge_instance_polygons([]).is_empty
    assert merge_instance_polygons([None, shapely.LineString([(0, 0), (1, 1)])]).is_empty


# ---- prompt_windows -----------------------------------------------------------------------------------------------


def _margins(box, grid):
    """Reference: for every tile holding ``box`` (grid pixels), its margins along x and y, sides on the image
    border counting as infinitely far."""
    x0, y0, x1, y1 = box
    t = grid.tile
    out = {}
    for tile in grid:
        if not (tile.x <= x0 and x1 <= tile.x + t and tile.y <= y0 and y1 <= tile.y + t):
            continue
        mx = min(x0 - tile.x if tile.x > 0 else np.inf, tile.x + t - x1 if tile.x + t < grid.width else np.inf)
        my = min(y0 - tile.y if tile.y > 0 else np.inf, tile.y + t - y1 if tile.y + t < grid.height else np.inf)
        out[tile.index] = (mx, my)
    return out


def _boxes(grid: TileGrid, rng: np.random.Generator) -> np.ndarray:
    """Random boxes of all sizes, plus boxes on tile corners and borders, the image corners, one bigger than a
    tile and one covering the whole image."""
    n = 300
    size = rng.choice([3.0, 20.0, 60.0, 110.0], n)[:, None] * rng.uniform(0.5, 1.5, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * ([grid.width, grid.height] - size)
    boxes = [np.concatenate([xy, xy + size], axis=1)]
    special = []
    for x in grid.xs[1:]:
        for y in grid.ys[1:]:
            special += [[x - 10, y - 10, x + 10, y + 10], [x - 1, y - 50, x + 1, y + 50]]  # a corner, a border
            special += [[x + grid.overlap - 30, y + 5, x + grid.overlap + 30, y + 60]]  # across the overlap
    w, h = grid.width, grid.height
    special += [[0, 0, 5, 5], [w - 7, h - 9, w, h], [0, h - 40, 30, h], [40, 30, 40 + 1.6 * grid.tile, 200]]
    special += [[0, 0, w, h], [17.5, 17.5, 17.5, 17.5]]  # the whole image, an empty box
    boxes.append(np.array(special, dtype=np.float64))
    return np.clip(np.concatenate(boxes), 0, [w, h, w, h])


@pytest.mark.parametrize(
    ("grid", "scale"),
    [(TileGrid(700, 530, 128, 32), 1.0), (TileGrid(517, 389, 96, 24), 2.5), (TileGrid(90, 300, 128, 40), 1.0)],
)
def test_every_box_is_prompted_once_in_a_window_that_contains_it(grid, scale):
    rng = np.random.default_rng(7)
    g = _boxes(grid, rng)
    windows = prompt_windows(g * scale, grid, scale)
    seen = np.concatenate([w.indices for w in windows])
    assert np.array_equal(np.sort(seen), np.arange(len(g)))  # each box exactly once
    t = grid.tile
    tiles = {tile.index: tile for tile in grid}
    own = 0
    for w in windows:
        assert isinstance(w, PromptWindow) and w.w == w.h and w.size == (t, t)
        assert np.all(np.diff(w.indices) > 0)
        b = g[w.indices]
        assert (b[:, 0] >= w.x).all() and (b[:, 1] >= w.y).all()
        assert (b[:, 2] <= w.x + w.w).all() and (b[:, 3] <= w.y + w.h).all()
        if w.tile >= 0:  # a grid tile: the most margin along each axis (so the largest smaller margin)
            tile = tiles[w.tile]
            assert (w.x, w.y, w.w, w.shrink) == (tile.x, tile.y, t, 1.0)
            for k in w.indices:
                ref = _margins(g[k], grid)
                assert min(ref[w.tile]) == max(min(m) for m in ref.values()) >= 4.0
                assert ref[w.tile][0] == max(m[0] for m in ref.values())
                assert ref[w.tile][1] == max(m[1] for m in ref.values())
                # ties: the lowest row and column
                assert w.tile == min(i for i, m in ref.items() if m == ref[w.tile])
        else:  # its own window: no tile has the margin, read at side / T
            own += 1
            assert len(w.indices) == 1 and w.shrink == pytest.approx(w.w / t) and w.w >= t
            assert max((min(m) for m in _margins(g[w.indices[0]], grid).values()), default=-1) < 4.0
            # pulled inside the image where the image is larger than the window
            if grid.width > w.w:
                assert 0 <= w.x <= grid.width - w.w
            if grid.height > w.h:
                assert 0 <= w.y <= grid.height - w.h
        # local boxes map back to the image boxes
        local = w.local_boxes(g * scale, scale)
        assert (local >= 0).all() and (local <= t).all()
        np.testing.assert_allclose(local * w.pixel(scale) + np.array(w.offset(scale) * 2), g[w.indices] * scale)
    assert own >= 2  # the whole-image box and the one bigger than a tile at least
    assert len(windows) - own <= len(grid)


def test_a_box_bigger_than_a_tile_gets_a_centred_window_read_at_a_downsample():
    grid = TileGrid(2000, 1500, 256, 64)
    box = np.array([[600.0, 500.0, 1000.0, 700.0]])  # 400 x 200 grid pixels, larger than a tile
    (w,) = prompt_windows(box * 2, grid, scale=2.0)
    assert w.tile == -1 and w.w == w.h == 400 * 1.2 + 2 and w.shrink == pytest.approx(482 / 256)
    assert (w.x, w.y) == (559, 359)  # centred on (800, 600)
    mask = np.ones(w.size, dtype=bool)
    poly = mask_to_polygons(mask, w.offset(2.0), w.pixel(2.0))
    assert poly.bounds == pytest.approx((559 * 2, 359 * 2, (559 + 482) * 2, (359 + 482) * 2))


def test_a_box_at_a_tiles_inner_edge_is_prompted_with_context():
    grid = TileGrid(512, 256, 256, 0)  # two tiles side by side, no overlap: nothing holds a box across x = 256
    boxes = np.array([[200.0, 50.0, 255.0, 80.0], [250.0, 50.0, 262.0, 80.0], [10.0, 10.0, 30.0, 30.0]])
    windows = prompt_windows(boxes, grid)
    by_box = {int(k): w for w in windows for k in w.indices}
    assert by_box[2].tile == 0 and by_box[2] is windows[0] and len(windows) == 3
    assert by_box[1].tile == -1 and by_box[1].w == 256 and by_box[1].shrink == 1.0
    assert by_box[1].x == 128  # centred on x = 256
    # 1 px from tile 0's inner edge: its own window, centred on it (x0 + x1 - 256) / 2 = 99.5 -> 100
    assert by_box[0].tile == -1 and (by_box[0].x, by_box[0].y) == (100, 0)
    # with no margin asked, it stays in its tile
    assert prompt_windows(boxes[:1], grid, min_margin=0.0)[0].tile == 0


def test_no_boxes_and_invalid_boxes():
    grid = TileGrid(300, 200, 128, 32)
    assert prompt_windows(np.zeros((0, 4)), grid) == []
    assert prompt_windows([], grid) == []
    with pytest.raises(InvalidRegionError, match=r"box 0 = .* inside the 300 x 200 grid times scale=2"):
        prompt_windows(np.array([[0, 0, 700, 100]]), grid, scale=2.0)
    with pytest.raises(InvalidRegionError, match="box 1"):
        prompt_windows(np.array([[0, 0, 5, 5], [9, 0, 5, 5]]), grid)
    with pytest.raises(InvalidRegionError, match="K x 4"):
        prompt_windows(np.zeros((3, 2)), grid)
    with pytest.raises(ConfigError, match="scale"):
        prompt_windows(np.zeros((1, 4)), grid, scale=-1.0)
