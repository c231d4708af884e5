"""Tiles read by DataLoader workers, each with its own handle, equal direct reads at the working resolution."""

from __future__ import annotations

import numpy as np
import pytest

from densevision import open_image
from densevision.engine import TileDataset, read_geometry, tile_loader
from densevision.errors import ConfigError, MissingResolutionError
from densevision.tiling import TileGrid


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_read_the_same_tiles(data_dir, workers):
    path = data_dir / "wsi/CMU-1-Small-Region.svs"
    with open_image(path) as src:
        grid = TileGrid(*src.size, 512, overlap=64)
        geometry = read_geometry(src)
        expected = {t.index: src.read_region((t.x, t.y), 0, (512, 512)) for t in grid}
    dataset = TileDataset(path, list(grid), geometry)
    seen = []
    for index, pixels, valid in tile_loader(dataset, batch_size=4, workers=workers):
        assert pixels.shape[1:] == (3, 512, 512) and valid.shape[1:] == (512, 512)
        for i, p, v in zip(index.tolist(), pixels, valid, strict=True):
            np.testing.assert_array_equal(p.numpy().transpose(1, 2, 0), expected[i].pixels)
            np.testing.assert_array_equal(v.numpy(), expected[i].valid)
            seen.append(i)
    assert seen == [t.index for t in grid]  # in order, each once


def test_target_mpp_reads_a_finer_level_and_resamples(data_dir):
    path = data_dir / "wsi/CMU-1-Small-Region.svs"  # 0.499 um/px, one level
    with open_image(path) as src:
        geometry = read_geometry(src, mpp=0.998)
        assert geometry.level == 0 and geometry.level_per_working == pytest.approx(2.0)
        grid = TileGrid(round(src.size[0] / 2), round(src.size[1] / 2), 256)
        tile = next(iter(grid))
        pixels, valid = TileDataset(path, [tile], geometry).read(tile)
        direct = src.read_region((0, 0), 0, (512, 512)).pixels.astype(np.float32)
    assert pixels.shape == (256, 256, 3) and valid.all()
    box = direct.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(pixels.astype(np.float32) - box).max() <= 1.0


def test_level_geometry_uses_real_downsamples(data_dir):
    with open_image(data_dir / "wsi/boxes.tiff") as src:
        g = read_geometry(src, level=2)
        assert (g.level, g.level_per_working) == (2, 1.0)
        assert g.downsample == pytest.approx(4.016129, rel=1e-6)
        with pytest.raises(MissingResolutionError, match="no trustworthy mpp"):
            read_geometry(src, mpp=2.0)
    with open_image(data_dir / "wsi/small.svs") as src, pytest.raises(ConfigError):
        read_geometry(src, level=0, mpp=1.0)


def test_heap_growth_is_bounded_on_glibc():
    """The runner fixes glibc's mmap threshold (see densevision.engine.heap); elsewhere it says it did nothing."""
    import platform

    from densevision.engine.heap import bound_heap_growth

    assert bound_heap_growth() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
