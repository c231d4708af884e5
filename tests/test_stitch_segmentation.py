"""Segmentation stitching against whole-image references: exact under ``crop``, brute-force averages under
``constant``, normalisation and seams under ``gaussian`` / ``hann``, nodata, band order and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
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
from densevision.tiling.grid import Tile, TileGrid


class Collect:
    """A sink that checks the band order and assembles the (small) test image."""

    def __init__(self, grid: TileGrid, c: int) -> None:
        self.logits = np.full((c, grid.height, grid.width), -1e9, dtype=np.float32)
        self.valid = np.zeros((grid.height, grid.width), dtype=bool)
        self.ranges: list[tuple[int, int]] = []
        self.width, self.c = grid.width, c

    def __call__(self, y0: int, logits: np.ndarray, valid: np.ndarray) -> None:
        h = logits.shape[1]
        assert logits.shape == (self.c, h, self.width) and logits.dtype == np.float32
        assert valid.shape == (h, self.width) and valid.dtype == bool
        assert y0 == (self.ranges[-1][1] if self.ranges else 0), "bands must be contiguous and increasing"
        self.ranges.append((y0, y0 + h))
        self.logits[:, y0 : y0 + h] = logits
        self.valid[y0 : y0 + h] = valid


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
    assert sink.ranges[0][0] == 0 and sink.ranges[-1][1] == grid.height
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
    classes = class_map(sink.logits, sink.valid)
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
    assert not sink.valid.any() and np.isnan(sink.logits).all() and st.max_held_rows == 0


def test_nan_under_zero_weight_does_not_leak_but_nan_where_valid_is_an_error():
    grid = TileGrid(100, 50, 64, 16)
    sink = Collect(grid, 1)
    st = SegmentationStitcher(grid, 1, "hann", sink)
    tiles = list(grid)
    logits = np.ones((1, 64, 64), dtype=np.float32)
    logits[:, 50:] = np.nan  # rows past the image: padding garbage
    valid = np.ones((64, 64), dtype=bool)
    valid[50:] = False
    st.add(tiles[0], logits, valid)
    bad = np.ones((1, 64, 64), dtype=np.float32)
    bad[0, 3, 3] = np.inf
    with pytest.raises(InvalidRegionError, match="non-finite"):
        st.add(tiles[1], bad, valid)
    st.add(tiles[1], np.ones((1, 64, 64), dtype=np.float32), valid)  # the failed call did not consume the tile
    st.finish()
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)


# ---- 5. band order and bounded memory ---------------------------------------------------------------------


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_tall_image_in_row_order_holds_less_than_two_tiles_of_rows(blend):
    grid = TileGrid(64, 5000, 64, 16)
    sink = Collect(grid, 1)
    st = SegmentationStitcher(grid, 1, blend, sink)
    ones = np.ones((1, 64, 64), dtype=np.float32)
    for t in grid:
        st.add(t, ones)
        assert st.rows_done > t.y  # rows are handed on as soon as they are final
    st.finish()
    starts = [r[0] for r in sink.ranges]
    assert starts == sorted(set(starts)) and sum(b - a for a, b in sink.ranges) == 5000
    assert st.max_held_rows <= grid.tile + grid.stride - 1 < 2 * grid.tile
    assert st.held_rows == 0 and st.complete
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)


def test_shuffled_batches_stay_bounded():
    # An engine's batches: row-major order, shuffled within each batch of 4 (at most two rows of tiles in flight).
    grid = TileGrid(200, 5000, 64, 16)
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
    assert st.max_held_rows < 2 * grid.tile + grid.stride
    np.testing.assert_allclose(sink.logits, 1, rtol=1e-6)


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
    logits = np.array([[[0.0, 2.0], [np.nan, -1.0]], [[1.0, 0.0], [np.nan, -3.0]]], dtype=np.float32)
    valid = np.array([[True, True], [False, True]])
    np.testing.assert_array_equal(class_map(logits, valid), [[1, 0], [255, 0]])
    p = probabilities(logits, valid)
    assert np.isnan(p[:, 1, 0]).all()
    np.testing.assert_allclose(np.nansum(p, axis=0)[valid], 1, rtol=1e-6)
    np.testing.assert_allclose(p[1, 0, 0], 1 / (1 + np.exp(-1.0)), rtol=1e-6)
    # one channel: a sigmoid head
    np.testing.assert_array_equal(class_map(logits[:1], valid), [[0, 1], [255, 0]])
    np.testing.assert_allclose(probabilities(logits[:1], valid)[0, 0, 1], 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    with pytest.raises(ConfigError, match="must not be a class index"):
        class_map(np.zeros((3, 1, 1)), np.ones((1, 1), bool), nodata=2)


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
        sinks = [ClassMapSink(classes, probs), ClassMapSink(pyramid)]
        st = SegmentationStitcher(grid, 3, "crop", lambda *a: [s(*a) for s in sinks])
        for tile, win, valid in windows(img, grid):
            st.add(tile, conv(win), valid & ~padded[tile.y : tile.y + 64, tile.x : tile.x + 64])
        st.finish()
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
