"""Low-resolution thumbnails and content masks (tissue for slides, nodata for rasters)."""

from __future__ import annotations

import numpy as np
import pytest

from densevision import open_image
from densevision.errors import InvalidRegionError
from densevision.tiling.grid import TileGrid
from densevision.tiling.masks import otsu_threshold, saturation, tiles_with_content, tissue_mask


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)])
    t = otsu_threshold(values)
    assert (values[:5000] < t).mean() > 0.99 and (values[5000:] > t).mean() > 0.99
    assert otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3)
    assert otsu_threshold(np.array([])) == 0.0


def test_saturation_values():
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0], [200, 100, 100]]], dtype=np.uint8)
    np.testing.assert_allclose(saturation(rgb)[0], [0.0, 1.0, 0.0, 0.5])


def test_tissue_mask_finds_a_planted_stained_blob():
    rgb = np.full((120, 160, 3), 242, dtype=np.uint8)  # glass
    rgb += np.random.default_rng(0).integers(0, 6, rgb.shape, dtype=np.uint8)  # grey sensor noise
    yy, xx = np.mgrid[:120, :160]
    blob = (yy - 60) ** 2 + (xx - 70) ** 2 < 30**2
    rgb[blob] = (200, 120, 170)  # eosin pink
    mask = tissue_mask(rgb)
    iou = (mask & blob).sum() / (mask | blob).sum()
    assert iou > 0.95
    assert not tissue_mask(np.full((50, 50, 3), 240, dtype=np.uint8)).any()  # glass only: nothing
    assert not tissue_mask(rgb, np.zeros((120, 160), dtype=bool)).any()  # nothing valid: nothing


def test_tissue_mask_on_the_real_slide(data_dir):
    with open_image(data_dir / "wsi/CMU-1-Small-Region.svs") as src:
        thumb = src.thumbnail(512)
    assert max(thumb.pixels.shape[:2]) == 512
    assert thumb.downsample == pytest.approx((2220 / 383, 2967 / 512), rel=1e-6)
    mask = tissue_mask(thumb.pixels, thumb.valid)
    assert 0.2 < mask.mean() < 0.5  # a strip of tissue on mostly glass
    assert not mask[20:150, :60].any() and not mask[400:, :60].any()  # glass on the left
    assert mask[380:480, 140:220].mean() > 0.95  # the dense tissue lower in the strip


def test_raster_thumbnail_carries_nodata(data_dir):
    with open_image(data_dir / "geotiff/RGB.byte.tif") as src:
        thumb = src.thumbnail(200)
    assert thumb.valid.shape == thumb.pixels.shape[:2] and max(thumb.valid.shape) == 200
    assert 0.55 < thumb.valid.mean() < 0.8  # about a third of the scene is nodata collar
    assert not thumb.valid[0, 0] and thumb.valid[100, 100]
    with open_image(data_dir / "geotiff/all-nodata.tif") as src:
        assert not src.thumbnail(64).valid.any()


def test_thumbnail_uses_a_pyramid_level_and_never_upsamples(data_dir):
    with open_image(data_dir / "wsi/boxes.tiff") as src:
        assert src.best_level_for_downsample(5.0) == 2  # 4.016 <= 5 < 8.086
        assert src.best_level_for_downsample(0.5) == 0
        thumb = src.thumbnail(40)
        assert thumb.pixels.shape == (33, 40, 3)
        assert src.thumbnail(10_000).pixels.shape == (250, 300, 3)
        with pytest.raises(InvalidRegionError):
            src.thumbnail(0)


def test_tiles_with_content_matches_a_brute_force_check():
    rng = np.random.default_rng(3)
    mask = rng.random((40, 50)) > 0.97
    grid = TileGrid(1000, 800, 128, overlap=32)
    scale = (1000 / 50, 800 / 40)
    keep = tiles_with_content(grid, mask, scale)
    full = np.kron(mask, np.ones((20, 20), dtype=bool))  # the mask at grid resolution
    for t in grid:
        assert keep[t.index] == full[t.y : t.y + 128, t.x : t.x + 128].any()
    assert 0 < keep.sum() < len(grid)


def test_glass_tiles_of_the_real_slide_are_skipped(data_dir):
    with open_image(data_dir / "wsi/CMU-1-Small-Region.svs") as src:
        thumb = src.thumbnail(512)
        grid = TileGrid(*src.size, 256)
    keep = tiles_with_content(grid, tissue_mask(thumb.pixels, thumb.valid), thumb.downsample)
    # 9 x 12 tiles: glass on the left and top right is skipped, the tissue strip down the middle is kept.
    assert grid.shape == (12, 9)
    assert 0.25 < 1 - keep.mean() < 0.75
    kept = keep.reshape(grid.shape)
    assert not kept[5:10, 0].any() and not kept[:2, 6:].any() and kept[2:, 4].all()
