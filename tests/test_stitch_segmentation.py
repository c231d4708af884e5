"""Segmentation stitching against whole-image references: exact under ``crop``, brute-force averages under
``constant``, normalisation and seams under ``gaussian`` / ``hann``, nodata, blocks emitted once each as soon as they
are final, bounded memory whatever the width, feed orders, and regrouping pieces into blocks; the device stitcher
(torch) against the numpy stitcher it replaced (``stitch_reference.py``): the same bits on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import stitch_reference as reference
import torch
from scipy import ndimage

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch import (
    BLEND_MODES,
    ClassMapSink,
    SegmentationStitcher,
    blend_window,
    class_map,
    probabilities,
    tile_window,
)
from densevision.stitch.segmentation import BlockAssembler, Reduction, block_edges, reduce_cell, stitch_order
from densevision.tiling.grid import Tile, TileGrid


class Collect:
    """A block sink that assembles the (small) test image and counts how often each pixel came."""

    def __init__(self, grid: TileGrid, c: int) -> None:
        self.logits = np.full((c, grid.height, grid.width), -1e9, dtype=np.float32)
        self.valid = np.zeros((grid.height, grid.width), dtype=bool)
        self.count = np.zeros((grid.height, grid.width), dtype=np.int32)
        self.blocks: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self.c = c

    def __call__(self, y0: int, x0: int, logits: torch.Tensor, valid: torch.Tensor) -> None:
        h, w = valid.shape
        assert isinstance(logits, torch.Tensor) and isinstance(valid, torch.Tensor)
        assert h > 0 and w > 0 and logits.shape == (self.c, h, w) and logits.dtype == torch.float32
        assert valid.dtype == torch.bool
        assert y0 + h <= self.count.shape[0] and x0 + w <= self.count.shape[1]
        logits, valid = logits.numpy().copy(), valid.numpy()
        assert (logits[:, ~valid] == 0).all()  # the contract: 0 where no tile had weight
        logits[:, ~valid] = np.nan  # below: NaN, as the numpy stitcher emitted
        self.blocks.append((y0, x0, logits.copy(), valid.copy()))
        self.logits[:, y0 : y0 + h, x0 : x0 + w] = logits
        self.valid[y0 : y0 + h, x0 : x0 + w] = valid
        self.count[y0 : y0 + h, x0 : x0 + w] += 1


def image(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((c, h, w)).astype(np.float32)


def windows(img: np.ndarray, grid: TileGrid):
    """Each tile with its ``C x T x T`` window of ``img`` (zero beyond the image) and ``T x T`` valid mask."""
    t = grid.tile
    padded = np.pad(img, ((0, 0), (0, t), (0, t)))
    for tile in grid:
        valid = np.zeros((t, t), dtype=bool)
        valid[: grid.height - tile.y, : grid.width - tile.x] = True
        yield tile, padded[:, tile.y : tile.y + t, tile.x : tile.x + t], valid


def stitch(grid, img, model, blend, *, order_seed=None, skip=(), valid_fn=None):
    c = model(img[:, :1, :1]).shape[0]
    sink = Collect(grid, c)
    st = SegmentationStitcher(grid, c, blend, sink)
    items = list(windows(img, grid))
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(items)
    for tile, win, valid in items:
        if tile.index in skip:
            st.skip(tile)
        else:
            st.add(tile, model(win), valid if valid_fn is None else valid & valid_fn(tile))
    st.finish()
    assert (sink.count == 1).all(), "every pixel is emitted exactly once"
    assert st.complete and st.held_pixels == 0 and st.rows_done == grid.height
    return sink, st


KERNEL = np.random.default_rng(1).standard_normal((17, 17))  # radius 8


def conv(x: np.ndarray) -> np.ndarray:
    """A convolution-only "model" with a receptive-field radius of 8, zero padding at the input's border."""
    return np.stack([ndimage.correlate(ch.astype(np.float64), KERNEL, mode="constant") for ch in x]).astype(np.float32)


# ---- blend windows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gaussian", "hann", "constant"])
@pytest.mark.parametrize("size", [1, 7, 64])
def test_windows_are_positive_symmetric_and_cached(mode, size):
    w = blend_window(mode, size)
    assert w.shape == (size, size) and w.dtype == np.float32
    assert w.max() == pytest.approx(1) and w.min() > 0
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(w, w[::-1, ::-1])
    assert blend_window(mode, size) is w and not w.flags.writeable


def test_crop_windows_are_the_owned_regions_and_sum_to_one():
    grid = TileGrid(150, 100, 64, 16)
    total = np.zeros((grid.height + 64, grid.width + 64))
    for tile in grid:
        total[tile.y : tile.y + 64, tile.x : tile.x + 64] += tile_window("crop", tile)
    np.testing.assert_array_equal(total[: grid.height, : grid.width], 1)


# ---- 1. exactness under crop -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,h",
    [(333, 250), (64, 64), (130, 70), (50, 40), (65, 200)],  # awkward sizes, exact tile, smaller than a tile
)
def test_crop_is_exact_when_the_halo_covers_the_receptive_field(w, h):
    grid = TileGrid(w, h, 64, 16)  # overlap 16 = 2 x radius 8
    img = image(3, h, w)
    sink, _ = stitch(grid, img, conv, "crop", order_seed=3)
    assert sink.valid.all()
    np.testing.assert_allclose(sink.logits, conv(img), rtol=0, atol=1e-5)


def test_crop_is_not_exact_when_the_halo_is_too_small():
    # The reference above is not trivially met: with overlap 8 < 2 x radius the seams show.
    grid = TileGrid(333, 250, 64, 8)
    img = image(3, 250, 333)
    sink, _ = stitch(grid, img, conv, "crop")
    assert np.abs(sink.logits - conv(img)).max() > 0.1


# ---- 2. constant: plain averaging --------------------------------------------------------------------------


def test_constant_is_the_average_of_overlapping_tiles():
    grid = TileGrid(200, 130, 64, 24)
    rng = np.random.default_rng(5)
    preds = {t.index: rng.standard_normal((2, 64, 64)).astype(np.float32) for t in grid}
    total = np.zeros((2, 130 + 64, 200 + 64))
    count = np.zeros((130 + 64, 200 + 64))
    for t in grid:
        total[:, t.y : t.y + 64, t.x : t.x + 64] += preds[t.index]
        count[t.y : t.y + 64, t.x : t.x + 64] += 1
    expected = total[:, :130, :200] / count[:130, :200]

    sink = Collect(grid, 2)
    st = SegmentationStitcher(grid, 2, "constant", sink)
    for t in reversed(list(grid)):
        st.add(t, preds[t.index])
    st.finish()
    assert count[:130, :200].max() >= 4  # overlaps of four (and more, by inward edge tiles) are exercised
    np.testing.assert_allclose(sink.logits, expected, rtol=1e-6, atol=1e-6)


# ---- 3. gaussian / hann: normalisation and seams ----------------------------------------------------------


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("w,h", [(333, 250), (40, 30)])
def test_constant_prediction_stitches_to_that_constant(blend, w, h):
    values = np.array([1.5, -2.0, 7.25], dtype=np.float32)
    grid = TileGrid(w, h, 64, 16)
    sink, _ = stitch(grid, image(1, h, w), lambda x: np.broadcast_to(values[:, None, None], (3, *x.shape[1:])), blend)
    assert sink.valid.all() and np.isfinite(sink.logits).all()
    np.testing.assert_allclose(sink.logits, np.broadcast_to(values[:, None, None], (3, h, w)), rtol=1e-6)


def test_smooth_blends_hide_seams():
    # A model that is wrong near its window's border (zero padding inside the image): the smooth windows weight
    # those pixels down, so the stitched result stays close to the whole-image prediction; plain averaging doesn't.
    h, w = 250, 333
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([np.sin(xx / 23.0) + np.cos(yy / 17.0) + 2, np.cos(xx / 31.0) * np.sin(yy / 11.0)])
    img = img.astype(np.float32)

    def model(x):
        return np.stack([ndimage.uniform_filter(ch, 7, mode="constant") for ch in x])

    reference = model(img)
    grid = TileGrid(w, h, 64, 16)
    dev = {b: np.abs(stitch(grid, img, model, b)[0].logits - reference).max() for b in BLEND_MODES}
    assert dev["crop"] < 1e-5  # halo 8 >= radius 3
    assert dev["constant"] > 0.2
    for b in ("gaussian", "hann"):  # values span about 0..4; hann tapers more slowly near the border
        assert dev[b] < 0.05, dev
        assert dev[b] < dev["constant"] / 25, dev


# ---- 4. zero weight: nodata --------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_pixels_invalid_in_every_tile_are_nodata(blend):
    grid = TileGrid(200, 150, 64, 16)
    hole = np.zeros((150, 200), dtype=bool)
    hole[40:90, 100:170] = True  # e.g. raster nodata, invalid in every tile covering it
    padded = np.pad(hole, ((0, 64), (0, 64)))

    def valid_fn(t):
        return ~padded[t.y : t.y + 64, t.x : t.x + 64]

    sink, _ = stitch(grid, image(2, 150, 200), conv, blend, valid_fn=valid_fn)
    np.testing.assert_array_equal(sink.valid, ~hole)
    assert np.isnan(sink.logits[:, hole]).all() and np.isfinite(sink.logits[:, ~hole]).all()
    classes = class_map(torch.from_numpy(sink.logits), torch.from_numpy(sink.valid)).numpy()
    assert (classes[hole] == 255).all() and (classes[~hole] < 2).all()


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_skipped_tiles_leave_nodata_where_only_they_reach(blend):
    grid = TileGrid(200, 150, 64, 16)
    skipped = {0, 5}  # a corner tile and an interior one
    sink, _ = stitch(grid, image(2, 150, 200), conv, blend, order_seed=7, skip=skipped)
    reach = np.zeros((150 + 64, 200 + 64), dtype=np.int32)  # how many fed tiles (owned regions for crop) cover
    for t in grid:
        if t.index not in skipped:
            x0, y0, x1, y1 = t.owned if blend == "crop" else (t.x, t.y, t.x + 64, t.y + 64)
            reach[y0:y1, x0:x1] += 1
    expected = reach[:150, :200] > 0
    assert not expected.all()
    np.testing.assert_array_equal(sink.valid, expected)
    assert np.isnan(sink.logits[:, ~expected]).all()


def test_a_band_with_every_tile_skipped_is_all_nodata():
    grid = TileGrid(100, 200, 64, 16)
    sink = Collect(grid, 2)
    st = SegmentationStitcher(grid, 2, "gaussian", sink)
    for t in grid:
        st.skip(t)
    st.finish()
    assert (sink.count == 1).all() and not sink.valid.any() and np.isnan(sink.logits).all()
    assert st.max_held_pixels == 0  # cells of skipped tiles only are never allocated


def non_finite(cells) -> list[tuple[object, str]]:
    """The reduced cells whose result raises, with the message."""
    failed = []
    for cell in cells:
        try:
            cell.result()
        except InvalidRegionError as e:
            failed.append((cell, str(e)))
    return failed


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
def test_nan_under_zero_weight_does_not_leak_but_nan_where_valid_is_an_error(garbage):
    grid = TileGrid(100, 50, 64, 16)
    sink = Collect(grid, 1)
    cells = []

    def both(y0, x0, logits, valid):
        cells.append(reduce_cell(y0, x0, logits, valid, probs=True))
        sink(y0, x0, logits, valid)

    st = SegmentationStitcher(grid, 1, "hann", both)
    tiles = list(grid)
    logits = np.ones((1, 64, 64), dtype=np.float32)
    logits[:, 50:] = garbage  # rows past the image: padding garbage
    valid = np.ones((64, 64), dtype=bool)
    valid[50:] = False
    st.add(tiles[0], logits, valid)
    st.add(tiles[1], logits, valid)
    st.finish()
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)
    for cell in cells:
        cmap, p = cell.result()
        assert (cmap == 1).all() and np.isfinite(p).all()
    # Where the tile is valid, a non-finite logit is an error: raised when its cell is final (with the reduced
    # cell, so that no tile waits for the device), naming the cell's pixels.
    cells.clear()
    st = SegmentationStitcher(grid, 1, "hann", both)
    bad = np.ones((1, 64, 64), dtype=np.float32)
    bad[0, 3, 10] = garbage  # image pixel (46, 3): in the cell of columns 36..64, which both tiles reach
    st.add(tiles[0], np.ones((1, 64, 64), dtype=np.float32), valid)
    st.add(tiles[1], bad, valid)
    st.finish()
    failed = non_finite(cells)
    assert all("non-finite logits" in e and "mark those pixels invalid" in e for _, e in failed)
    # the cell shared by both tiles: rows 0..50, columns 36..64
    assert [(c.y0, c.x0, c.shape) for c, _ in failed] == [(0, 36, (50, 28))]


# ---- 5. blocks as soon as they are final, bounded memory, feed orders -------------------------------------


def strip(grid: TileGrid) -> int:
    """Rows the next tile row still adds to once a tile row is in: the overlap, more above a last tile row that
    is shifted inward."""
    ys = grid.ys
    return max([ys[r] + grid.tile - ys[r + 1] for r in range(len(ys) - 1)], default=0)


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("w,h", [(333, 250), (64, 64), (50, 40), (200, 130)])
def test_every_pixel_is_emitted_once_in_cells_cut_at_the_tile_edges(blend, w, h):
    grid = TileGrid(w, h, 64, 24)
    sink, _ = stitch(grid, image(2, h, w), conv, blend, order_seed=1)  # checks each pixel came exactly once
    if blend == "crop":  # one cell per owned region
        rows = {e for t in grid for e in (t.owned[1], t.owned[3])}
        cols = {e for t in grid for e in (t.owned[0], t.owned[2])}
        assert len(sink.blocks) == len(grid)
    else:
        rows = {e for y in grid.ys for e in (y, min(y + 64, h))}
        cols = {e for x in grid.xs for e in (x, min(x + 64, w))}
    cells = {(y, x) for y in sorted(rows | {0})[:-1] for x in sorted(cols | {0})[:-1]}
    origins = [(y0, x0) for y0, x0, *_ in sink.blocks]
    assert len(origins) == len(set(origins)) and set(origins) == cells


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_tall_image_in_row_order_hands_rows_on_at_once(blend):
    grid = TileGrid(64, 5000, 64, 16)
    sink = Collect(grid, 1)
    st = SegmentationStitcher(grid, 1, blend, sink)
    ones = np.ones((1, 64, 64), dtype=np.float32)
    for t in grid:
        st.add(t, ones)
        assert st.rows_done > t.y  # rows are handed on as soon as they are final
    st.finish()
    assert (sink.count == 1).all()
    assert st.max_held_pixels <= strip(grid) * grid.width + 64 * 64
    assert st.held_pixels == 0 and st.complete
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "hann", "constant"])
@pytest.mark.parametrize("w,h", [(5000, 304), (2500, 304), (5031, 304), (5000, 300), (4999, 177)])
def test_wide_image_in_row_order_holds_one_overlap_strip_plus_a_tile(blend, w, h):
    grid = TileGrid(w, h, 64, 16)
    if (h - 64) % grid.stride == 0:  # no tile row shifted inward: the strip is the overlap
        assert strip(grid) == grid.overlap
    sink = Collect(grid, 1)
    st = SegmentationStitcher(grid, 1, blend, sink)
    ones = np.ones((1, 64, 64), dtype=np.float32)
    for t in grid:
        st.add(t, ones)
    st.finish()
    assert (sink.count == 1).all() and st.held_pixels == 0
    # The bound of the module docstring, whatever the width; and the strip really is held (the bound is tight).
    assert strip(grid) * (w - 64) < st.max_held_pixels <= strip(grid) * w + 64 * 64
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "constant", "crop"])
@pytest.mark.parametrize("w,h", [(5000, 300), (4999, 177), (5000, 304), (3000, 100)])
def test_stitch_order_holds_the_overlap_even_above_a_shifted_last_row(blend, w, h):
    grid = TileGrid(w, h, 64, 16)
    order = stitch_order(grid)
    assert sorted(t.index for t in order) == list(range(len(grid)))
    shifted = strip(grid) > grid.overlap
    assert (order != list(grid)) == shifted  # row-major unless the last tile row is shifted inward
    if shifted:  # then the last two rows go column by column
        tail = order[-2 * len(grid.xs) :]
        r = len(grid.ys) - 2
        assert [(t.row, t.col) for t in tail[:4]] == [(r, 0), (r + 1, 0), (r, 1), (r + 1, 1)]
    sink = Collect(grid, 1)
    st = SegmentationStitcher(grid, 1, blend, sink)
    ones = np.ones((1, 64, 64), dtype=np.float32)
    for t in order:
        st.add(t, ones)
    st.finish()
    assert (sink.count == 1).all() and st.held_pixels == 0
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)
    # The module docstring's bound: the overlap strip of the whole width plus a few tiles, whatever the shift.
    assert st.max_held_pixels <= grid.overlap * w + 3 * 64 * 64
    if shifted and blend != "crop":  # row-major would have held the larger strip over the whole width
        assert st.max_held_pixels < strip(grid) * (w - 64)


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_blocks_of_the_grid_are_final_once_their_tile_is_in(blend):
    grid = TileGrid(333, 250, 64, 24)  # last row and column shifted inward
    rows, cols = block_edges(grid, blend)
    if blend == "crop":  # the owned regions: one per tile
        assert rows == [0, *(t.owned[3] for t in grid if t.col == 0)]
        assert cols == [0, *(t.owned[2] for t in grid if t.row == 0)]
    else:  # the tile rows, cut at the tile columns too
        assert rows == [*grid.ys, grid.height] and cols == [*grid.xs, grid.width]
    img = image(2, 250, 333)
    got: list[tuple[int, int, np.ndarray]] = []
    asm = BlockAssembler(rows, cols, lambda y0, x0, cm, lg: got.append((y0, x0, lg)))
    sink = Collect(grid, 2)

    def both(y0, x0, logits, valid):
        sink(y0, x0, logits, valid)
        h, w = valid.shape
        asm(y0, x0, class_map(logits, valid).numpy(), sink.logits[:, y0 : y0 + h, x0 : x0 + w])  # h x w, C x h x w

    st = SegmentationStitcher(grid, 2, blend, both)
    by_index = {t.index: (t, win, valid) for t, win, valid in windows(img, grid)}
    seen = set()
    for t in stitch_order(grid):
        _, win, valid = by_index[t.index]
        st.add(t, conv(win), valid)
        seen.add((t.row, t.col))
        # Block (k, c) has come as soon as tile (k, c) is in; at most a few blocks are ever waiting.
        assert {(rows.index(y0), cols.index(x0)) for y0, x0, _ in got} >= seen
        assert asm.held_bytes <= 64 * 64 * 9  # under crop none: each cell is one block
    st.finish()
    asm.finish()
    assert asm.complete and asm.held_bytes == 0 and len(got) == len(grid)
    for y0, x0, lg in got:
        h, w = lg.shape[1:]
        np.testing.assert_array_equal(lg, sink.logits[:, y0 : y0 + h, x0 : x0 + w])


def test_block_assembler_block_rows_any_order_and_bad_use():
    full = np.arange(20 * 30, dtype=np.int32).reshape(20, 30)
    rows, cols = [0, 7, 13, 20], [0, 11, 30]
    got: dict[tuple[int, int], np.ndarray] = {}
    asm = BlockAssembler(rows, cols, lambda y0, x0, a: got.setdefault((y0, x0), a.copy()), block_rows=(1, 3))
    for y, x in reversed([(y, x) for y in range(0, 20, 5) for x in range(0, 30, 10)]):  # straddle the blocks
        asm(y, x, full[y : y + 5, x : x + 10])
    asm.finish()
    assert sorted(got) == [(7, 0), (7, 11), (13, 0), (13, 11)]  # only the block rows asked for
    for (y0, x0), a in got.items():
        np.testing.assert_array_equal(a, full[y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]])
    assert asm.held_bytes == 0 and asm.max_held_bytes > 0
    with pytest.raises(ConfigError, match="column edges"):
        BlockAssembler([0, 5], [0, 3, 3], lambda *a: None)
    asm = BlockAssembler([0, 5, 9], [0, 4, 10], lambda *a: None)
    asm(0, 0, np.zeros((5, 4)))
    with pytest.raises(InvalidRegionError, match=r"block \(0, 0\) .* was complete already"):
        asm(4, 3, np.zeros((1, 1)))
    asm(0, 4, np.zeros((3, 6)))
    with pytest.raises(InvalidRegionError, match=r"block \(0, 1\) .* more pixels than it has"):
        asm(2, 4, np.zeros((3, 6)))
    with pytest.raises(InvalidRegionError, match=r"the first block \(1, 0\) .* got no pixel"):
        BlockAssembler([0, 5, 9], [0, 10], lambda *a: None, block_rows=(1, 2)).finish()


def test_crop_holds_one_owned_region_at_most():
    grid = TileGrid(5000, 300, 64, 16)
    sink = Collect(grid, 2)
    st = SegmentationStitcher(grid, 2, "crop", sink)
    rng = np.random.default_rng(0)
    for t in rng.permutation(list(grid)):  # any order: each owned region is final at its tile's add
        st.add(t, np.zeros((2, 64, 64), dtype=np.float32))
        assert st.held_pixels == 0
    st.finish()
    assert (sink.count == 1).all() and len(sink.blocks) == len(grid)
    assert 0 < st.max_held_pixels <= max((t.owned[2] - t.owned[0]) * (t.owned[3] - t.owned[1]) for t in grid)
    assert st.max_held_pixels <= 64 * 64


def test_shuffled_batches_stay_bounded():
    # An engine's batches: row-major order, shuffled within each batch of 4 (at most two rows of tiles in flight).
    grid = TileGrid(1000, 1000, 64, 16)
    sink = Collect(grid, 1)
    st = SegmentationStitcher(grid, 1, "gaussian", sink)
    tiles = list(grid)
    rng = np.random.default_rng(0)
    ones = np.ones((1, 64, 64), dtype=np.float32)
    for i in range(0, len(tiles), 4):
        batch = tiles[i : i + 4]
        for j in rng.permutation(len(batch)):
            st.add(batch[j], ones)
    st.finish()
    assert (sink.count == 1).all()
    assert st.max_held_pixels <= strip(grid) * grid.width + 4 * 64 * 64
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)


def test_cells_of_skipped_tiles_are_emitted_as_nodata_at_once_without_allocating():
    grid = TileGrid(200, 150, 64, 16)  # tile rows at 0, 48, 86: rows [0, 48) are tile row 0's alone
    sink = Collect(grid, 2)
    st = SegmentationStitcher(grid, 2, "gaussian", sink)
    tiles = list(grid)
    for t in tiles:
        if t.row == 0:
            st.skip(t)
    assert st.max_held_pixels == 0 and st.rows_done == 48
    assert (sink.count[:48] == 1).all() and not sink.count[48:].any()
    assert not sink.valid[:48].any() and np.isnan(sink.logits[:, :48]).all()
    for t in tiles:
        if t.row > 0:
            st.add(t, np.zeros((2, 64, 64), dtype=np.float32))
    st.finish()
    assert (sink.count == 1).all() and sink.valid[48:].all() and not sink.valid[:48].any()


def coverage(grid: TileGrid) -> np.ndarray:
    """How many tile windows cover each pixel."""
    n = np.zeros((grid.height + grid.tile, grid.width + grid.tile), dtype=np.int32)
    for t in grid:
        n[t.y : t.y + grid.tile, t.x : t.x + grid.tile] += 1
    return n[: grid.height, : grid.width]


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_feed_orders_give_the_same_image_and_a_repeated_order_the_same_bits(blend):
    grid = TileGrid(333, 250, 64, 24)
    img = image(2, 250, 333)
    items = list(windows(img, grid))
    rng = np.random.default_rng(2)
    by_row = [[it for it in items if it[0].row == r] for r in range(grid.shape[0])]
    orders = {
        "row-major": items,
        "shuffled within rows": [row[i] for row in by_row for i in rng.permutation(len(row))],
        "shuffled": [items[i] for i in rng.permutation(len(items))],
    }
    results = {}
    for name, order in orders.items():
        sink = Collect(grid, 2)
        st = SegmentationStitcher(grid, 2, blend, sink)
        for tile, win, valid in order:
            st.add(tile, conv(win), valid)
        st.finish()
        assert (sink.count == 1).all()
        results[name] = sink
    ref = results["row-major"]
    # Per pixel, float32 sums in feed order: with one or two contributions the order cannot matter to the bit.
    exact = coverage(grid) <= 2 if blend != "crop" else np.ones((250, 333), dtype=bool)
    assert exact.any() and (blend == "crop" or not exact.all())
    for name, sink in results.items():
        np.testing.assert_array_equal(sink.valid, ref.valid, err_msg=name)
        np.testing.assert_array_equal(sink.logits[:, exact], ref.logits[:, exact], err_msg=name)
        np.testing.assert_allclose(sink.logits, ref.logits, rtol=1e-6, atol=1e-6, err_msg=name)
    again = Collect(grid, 2)
    st = SegmentationStitcher(grid, 2, blend, again)
    for tile, win, valid in orders["shuffled"]:
        st.add(tile, conv(win), valid)
    st.finish()
    first = results["shuffled"].blocks
    assert [(y, x) for y, x, *_ in again.blocks] == [(y, x) for y, x, *_ in first]
    for (*_, lg, v), (*_, lg2, v2) in zip(first, again.blocks, strict=True):
        assert lg.tobytes() == lg2.tobytes() and v.tobytes() == v2.tobytes()


# ---- 6. bad use --------------------------------------------------------------------------------------------


def test_unknown_blend_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="crop, gaussian, hann, constant"):
        SegmentationStitcher(TileGrid(100, 100, 64), 2, "linear", lambda *a: None)


def test_bad_use_raises_clear_errors():
    grid = TileGrid(100, 100, 64, 16)
    st = SegmentationStitcher(grid, 3, "crop", lambda *a: None)
    tiles = list(grid)
    st.add(tiles[0], np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(InvalidRegionError, match="already added or skipped"):
        st.add(tiles[0], np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(InvalidRegionError, match="already added or skipped"):
        st.skip(tiles[0])
    with pytest.raises(InvalidRegionError, match=r"C x T x T = \(3, 64, 64\), got \(2, 64, 64\)"):
        st.add(tiles[1], np.zeros((2, 64, 64), dtype=np.float32))
    with pytest.raises(InvalidRegionError, match="valid mask"):
        st.add(tiles[1], np.zeros((3, 64, 64), dtype=np.float32), np.ones((32, 32), dtype=bool))
    stranger = Tile(1, 0, 1, 30, 0, 64, 64, (50, 0, 100, 50))
    with pytest.raises(InvalidRegionError, match="not a tile of this"):
        st.add(stranger, np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(InvalidRegionError, match="3 of 4 tiles were neither added nor skipped"):
        st.finish()
    with pytest.raises(ConfigError, match="num_classes"):
        SegmentationStitcher(grid, 0, "crop", lambda *a: None)


# ---- helpers for writers -----------------------------------------------------------------------------------


def test_class_map_and_probabilities():
    logits = torch.tensor([[[0.0, 2.0], [np.nan, -1.0]], [[1.0, 0.0], [np.nan, -3.0]]])
    valid = torch.tensor([[True, True], [False, True]])
    np.testing.assert_array_equal(class_map(logits, valid), [[1, 0], [255, 0]])  # whatever is under invalid
    p = probabilities(logits, valid).numpy()
    assert np.isnan(p[:, 1, 0]).all()
    np.testing.assert_allclose(np.nansum(p, axis=0)[valid.numpy()], 1, rtol=1e-6)
    np.testing.assert_allclose(p[1, 0, 0], 1 / (1 + np.exp(-1.0)), rtol=1e-6)
    # one channel: a sigmoid head
    np.testing.assert_array_equal(class_map(logits[:1], valid), [[0, 1], [255, 0]])
    np.testing.assert_allclose(probabilities(logits[:1], valid)[0, 0, 1], 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    # ties: the first maximal class, as numpy's argmax
    ties = torch.tensor([[[1.0, 0.0, 2.0]], [[1.0, 3.0, 2.0]], [[0.0, 3.0, 2.0]]])
    np.testing.assert_array_equal(class_map(ties, torch.ones((1, 3), dtype=torch.bool)), [[0, 1, 0]])
    with pytest.raises(ConfigError, match="must not be a class index"):
        class_map(torch.zeros((3, 1, 1)), torch.ones((1, 1), dtype=torch.bool), nodata=2)


@pytest.mark.parametrize("classes", [2, 3, 150, 300])
def test_class_map_is_numpys_first_argmax(classes):
    """Many ties (small integer logits) and more classes than uint8 holds (int32 indices inside)."""
    rng = np.random.default_rng(classes)
    logits = rng.integers(0, 4, size=(classes, 37, 53)).astype(np.float32)
    valid = rng.random((37, 53)) > 0.1
    logits[classes - 1, 0, :5] = 9  # the last class wins somewhere (above 255 with 300)
    valid[0, :5] = True
    nodata, dtype = (65535, torch.int32) if classes > 255 else (255, torch.uint8)
    got = class_map(torch.from_numpy(logits), torch.from_numpy(valid), nodata=nodata, dtype=dtype).numpy()
    np.testing.assert_array_equal(got, np.where(valid, np.argmax(logits, axis=0), nodata))
    assert got[0, 0] == classes - 1


def test_class_map_sink_feeds_the_writers(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    from densevision.io.writers import GeoTiffWriter, PyramidTiffWriter

    geo = {"crs": "EPSG:32618", "transform": Affine(0.5, 0, 500000, 0, -0.5, 4e6), "block_size": 64}

    h, w = 150, 200
    grid = TileGrid(w, h, 64, 16)
    img = image(3, h, w)
    hole = np.zeros((h, w), dtype=bool)
    hole[:20, :30] = True
    padded = np.pad(hole, ((0, 64), (0, 64)))
    with (
        GeoTiffWriter(tmp_path / "classes.tif", w, h, 1, np.uint8, nodata=255, **geo) as classes,
        GeoTiffWriter(tmp_path / "probs.tif", w, h, 3, np.float32, nodata=float("nan"), **geo) as probs,
        PyramidTiffWriter(tmp_path / "pyramid.tif", w, h, tile_size=64) as pyramid,
    ):
        sinks = [ClassMapSink(grid, classes, probs), ClassMapSink(grid, pyramid)]
        st = SegmentationStitcher(grid, 3, "crop", lambda *a: [s(*a) for s in sinks])
        for tile, win, valid in windows(img, grid):
            st.add(tile, conv(win), valid & ~padded[tile.y : tile.y + 64, tile.x : tile.x + 64])
        st.finish()
        for s in sinks:
            s.finish()
    expected = np.where(hole, 255, conv(img).argmax(axis=0))
    with rasterio.open(tmp_path / "classes.tif") as ds:
        np.testing.assert_array_equal(ds.read(1), expected)
        assert ds.crs.to_epsg() == 32618 and ds.nodata == 255
    with rasterio.open(tmp_path / "probs.tif") as ds:
        p = ds.read()
        assert np.isnan(p[:, hole]).all()
        np.testing.assert_array_equal(p[:, ~hole].argmax(axis=0), expected[~hole])
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "pyramid.tif"), expected)


# ---- 7. the device stitcher against the numpy stitcher it replaced -----------------------------------------


def _predictions(grid: TileGrid, c: int, seed: int):
    """Per tile: logits with ties (quantised to halves), NaN garbage in the padding past the image, a hole of
    nodata; two tiles skipped (the last, and one inside)."""
    rng = np.random.default_rng(seed)
    t = grid.tile
    hole = np.zeros((grid.height + t, grid.width + t), dtype=bool)
    hole[30:70, 90:150] = True
    out = []
    for tile in stitch_order(grid):
        logits = (np.round(rng.standard_normal((c, t, t)) * 6) / 2).astype(np.float32)
        valid = ~hole[tile.y : tile.y + t, tile.x : tile.x + t]
        valid[grid.height - tile.y :] = False
        valid[:, grid.width - tile.x :] = False
        logits[:, grid.height - tile.y :] = np.nan
        out.append((tile, logits, valid, tile.index in (len(grid) - 1, 4)))
    return out


def _split_every_cell(monkeypatch):
    """Every cell cut into one-row bands shared with two helper threads (densevision.stitch.rows), however small."""
    from densevision.stitch import rows

    monkeypatch.setattr(rows, "SPLIT_ELEMENTS", 0)
    monkeypatch.setattr(rows, "BAND_ELEMENTS", 1)
    monkeypatch.setattr(rows, "helpers", lambda: 2)


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("c", [1, 2, 150])  # 150: ADE20k's classes
def test_the_device_stitcher_gives_the_numpy_stitchers_bits_on_the_cpu(blend, c):
    grid = TileGrid(203, 157, 64, 24)  # last row and column shifted inward; tiles past the image's corner
    preds = _predictions(grid, c, seed=c)
    ref: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    old = reference.SegmentationStitcher(grid, c, blend, lambda y0, x0, lg, v: ref.append((y0, x0, lg, v)))
    new: list[tuple[int, int, np.ndarray, np.ndarray, object]] = []

    def device_sink(y0, x0, logits, valid):
        new.append(
            (y0, x0, logits.numpy().copy(), valid.numpy().copy(), reduce_cell(y0, x0, logits, valid, probs=True))
        )

    dev = SegmentationStitcher(grid, c, blend, device_sink, device="cpu")
    for tile, logits, valid, skipped in preds:
        for st in (old, dev):
            if skipped:
                st.skip(tile)
            else:
                st.add(tile, torch.from_numpy(logits) if st is dev else logits, valid)
    old.finish()
    dev.finish()
    assert [(y, x) for y, x, *_ in new] == [(y, x) for y, x, *_ in ref]  # the same cells, in the same order
    worst = 0.0
    for (_, _, lg, v), (_, _, lg2, v2, cell) in zip(ref, new, strict=True):
        np.testing.assert_array_equal(v2, v)
        # The same float32 sums, to the bit but for the sign of zero (a cell's first contribution is its sum: -0
        # where 0 + -0 gives +0), which no output tells apart.
        assert np.array_equal(lg2[:, v], lg[:, v])
        cmap, probs = cell.result()
        np.testing.assert_array_equal(cmap, reference.class_map(lg, v))
        expected = reference.probabilities(lg, v)  # C x h x w
        assert probs.shape == expected.shape and probs.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(probs), np.isnan(expected))
        worst = max(worst, float(np.nanmax(np.abs(probs - expected), initial=0.0)))
    assert (~np.concatenate([v.ravel() for *_, v in ref])).any()  # nodata and skipped tiles were exercised
    print(f"largest probability difference, {blend}, K = {c}: {worst:.3g}")
    assert worst <= 1e-6, worst  # torch.exp and numpy.exp may differ by an ulp


def test_a_zero_weight_product_of_plus_zero_changes_no_sum():
    # The device stitcher adds +0 where a tile has weight 0 (masked_fill) where numpy added logits * 0, which is -0
    # for negative logits: a float32 sum starting at +0 never becomes -0, so no bit changes (checked, not assumed).
    terms = torch.tensor([[-0.0, 0.0, -0.0, 1.5, -2.0], [-0.0, -0.0, 0.0, -1.5, 2.0], [-0.0, 3.0, -0.0, -0.0, -0.0]])
    a, b = torch.zeros(5), torch.zeros(5)
    for row in terms:
        a.add_(row)
        b.add_(torch.where(row == 0, 0.0, row))  # the zeros as +0
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.signbit(a).any()


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_cells_given_back_with_reuse_serve_later_cells_without_changing_a_bit(blend):
    grid = TileGrid(203, 157, 64, 24)
    preds = _predictions(grid, 3, seed=5)
    runs = []
    for give_back in (False, True):
        cells: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        seen: set[int] = set()

        def sink(y0, x0, logits, valid, give_back=give_back, cells=cells, seen=seen):
            cells.append((y0, x0, logits.numpy().copy(), valid.numpy().copy()))
            seen.add(logits.data_ptr())
            if give_back:
                st.reuse(logits)  # noqa: B023  (the stitcher of this run)

        st = SegmentationStitcher(grid, 3, blend, sink)
        for tile, logits, valid, skipped in preds:
            st.skip(tile) if skipped else st.add(tile, torch.from_numpy(logits), valid)
        st.finish()
        runs.append((cells, len(seen), st._free.held))
    (plain, _, _), (reused, distinct, pooled) = runs
    assert len(plain) == len(reused)
    for (y, x, lg, v), (y2, x2, lg2, v2) in zip(plain, reused, strict=True):
        assert (y, x) == (y2, x2)
        np.testing.assert_array_equal(v2, v)
        assert lg2[:, v].tobytes() == lg[:, v].tobytes()
    assert distinct < len(reused)  # cells got the memory of earlier ones
    assert 0 < pooled <= 3 * grid.tile**2  # at most a tile's pixels are kept (3 classes)


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("c", [1, 2, 19, 150])
@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "rows-split"])
def test_cells_reduced_by_the_stitcher_give_the_reference_class_maps_and_probabilities(blend, c, split, monkeypatch):
    # With a Reduction the CPU makes each class map in one pass with the cell's last contribution (fused.py), which
    # leaves the normalised logits for the probabilities. Against the numpy stitcher's cells, argmax and softmax: ties
    # everywhere (logits quantised to halves), NaN under padding, a hole of nodata, the last contributor of some cells
    # skipped. Class maps to the bit; probabilities to an ulp of numpy's exp, and to the bit against torch's softmax
    # of the reference's sums. Split: each cell's rows shared between threads.
    if split:
        _split_every_cell(monkeypatch)
    grid = TileGrid(203, 157, 64, 24)
    preds = _predictions(grid, c, seed=c + 1)
    ref: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    old = reference.SegmentationStitcher(grid, c, blend, lambda y0, x0, lg, v: ref.append((y0, x0, lg, v)))
    kinds = {
        "classes": Reduction(),
        "float32": Reduction(probs=True),
        "uint8": Reduction(True, probs_dtype=torch.uint8),
    }
    runs: dict[str, list] = {kind: [] for kind in kinds}
    stitchers = [old] + [SegmentationStitcher(grid, c, blend, runs[k].append, reduction=r) for k, r in kinds.items()]
    for tile, logits, valid, skipped in preds:
        for st in stitchers:
            st.skip(tile) if skipped else st.add(tile, logits if st is old else torch.from_numpy(logits), valid)
    assert [st._fused for st in stitchers[1:]] == [True, True, True]
    for st in stitchers:
        st.finish()
        assert st is old or st.held_pixels == 0
    assert (~np.concatenate([v.ravel() for *_, v in ref])).any()  # nodata was exercised
    worst = 0.0
    for kind, cells in runs.items():
        assert [(cell.y0, cell.x0) for cell in cells] == [(y, x) for y, x, *_ in ref]  # same cells, same order
        for cell, (_, _, lg, v) in zip(cells, ref, strict=True):
            cmap, p = cell.result()
            assert cmap.dtype == np.uint8
            np.testing.assert_array_equal(cmap, reference.class_map(lg, v))
            if kind == "classes":
                assert p is None
                continue
            expected = reference.probabilities(lg, v)  # C x h x w
            assert p.shape == expected.shape and p.dtype == np.dtype(kind)
            if kind == "uint8":
                # round(p * 254), 255 where no tile had weight; an ulp of exp may move a value across a half
                quantised = np.where(np.isnan(expected), 255, np.rint(np.nan_to_num(expected) * 254))
                assert np.abs(p.astype(np.int16) - quantised).max(initial=0) <= 1
                assert ((p == 255) == np.isnan(expected)).all()
            else:
                np.testing.assert_array_equal(np.isnan(p), np.isnan(expected))
                worst = max(worst, float(np.nanmax(np.abs(p - expected), initial=0.0)))
                # torch's softmax of the same sums (the device stitcher's): the same bits, NaN in the same places
                np.testing.assert_array_equal(p, probabilities(torch.from_numpy(lg.copy()), torch.from_numpy(v)))
    print(f"largest probability difference, {blend}, K = {c}: {worst:.3g}")
    assert worst <= 1e-6, worst


def test_the_fused_class_map_holds_no_sums_for_cells_with_one_contributor():
    # Under crop every cell has one contributor: the fused stitcher never allocates an accumulator (a negative
    # control: the stitcher that hands out logits does).
    grid = TileGrid(203, 157, 64, 24)
    st = SegmentationStitcher(grid, 3, "crop", lambda cell: None, reduction=Reduction())
    for tile, logits, valid, _ in _predictions(grid, 3, seed=1):
        st.add(tile, torch.from_numpy(logits), valid)
    st.finish()
    assert st.max_held_pixels == 0
    negative = SegmentationStitcher(grid, 3, "crop", lambda *cell: None)
    negative.add(next(iter(grid)), torch.zeros((3, 64, 64)))
    assert negative.max_held_pixels > 0


@pytest.mark.parametrize("probs", [False, True])
def test_non_finite_logits_where_a_tile_is_valid_stop_a_reducing_stitcher(probs):
    grid = TileGrid(100, 80, 64, 16)
    cells: list = []
    st = SegmentationStitcher(grid, 2, "gaussian", cells.append, reduction=Reduction(probs=probs))
    order = stitch_order(grid)
    inf_tile = order[1]
    for tile in order:
        logits = torch.zeros((2, 64, 64))
        if tile is inf_tile:
            logits[1, 40, 40] = float("inf")  # in the overlap with the first tile: a cell with two contributors
        st.add(tile, logits)
    st.finish()
    bad = non_finite(cells)
    assert len(bad) == 1
    cell, message = bad[0]
    y, x = inf_tile.y + 40, inf_tile.x + 40
    assert cell.y0 <= y < cell.y0 + cell.shape[0] and cell.x0 <= x < cell.x0 + cell.shape[1]
    assert "non-finite logits" in message


def test_a_reducing_stitcher_refuses_a_nodata_that_is_a_class():
    with pytest.raises(ConfigError, match="nodata 2 must not be a class index"):
        SegmentationStitcher(TileGrid(100, 100, 64), 3, "crop", lambda cell: None, reduction=Reduction(nodata=2))


def test_the_cell_pool_reuses_the_oldest_of_a_size_and_drops_the_oldest_of_all():
    from densevision.stitch.segmentation import _BufferPool

    pool = _BufferPool(limit=10, device=torch.device("cpu"))
    a, b, c = torch.empty(4), torch.empty(3), torch.empty(4)
    for t in (a, b, c):
        pool.give(t)
    assert pool.held == 11 - 4  # 4 + 3 + 4 > 10: the oldest (a) went
    assert pool.take((2, 2)).data_ptr() == c.data_ptr()  # the 4-element one left
    assert pool.take((4,)).data_ptr() not in (a.data_ptr(), b.data_ptr(), c.data_ptr())  # none left: new
    d, e = torch.empty(3), torch.empty(5)
    pool.give(d)
    pool.give(e)  # 3 + 3 + 5 > 10: the oldest 3-element one (b) goes, not the newer d
    assert pool.held == 8
    assert pool.take((3,)).data_ptr() == d.data_ptr()
    pool.give(torch.empty(11))  # larger than the pool: not kept
    assert pool.held == 5


def test_numba_is_imported_only_where_a_cpu_stitcher_reduces_cells():
    # numba and its LLVM take 61 MiB and 0.1 s at import: detection, info and training never pay for them.
    import subprocess
    import sys

    code = """
import sys, torch
import densevision, densevision.apis.detect, densevision.cli
from densevision.stitch.segmentation import Reduction, SegmentationStitcher
from densevision.tiling.grid import TileGrid
before = "numba" in sys.modules
grid = TileGrid(64, 64, 64)
tile, logits = next(iter(grid)), torch.zeros((2, 64, 64))
SegmentationStitcher(grid, 2, "crop", lambda *a: None).add(tile, logits)
logits_sink = "numba" in sys.modules
SegmentationStitcher(grid, 2, "crop", lambda c: None, reduction=Reduction()).add(tile, logits)
print(before, logits_sink, "numba" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]
