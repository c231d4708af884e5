"""open_image and read_region on the real sample files, generated rasters and bad input."""

from __future__ import annotations

import shutil

import numpy as np
import openslide
import pytest
import rasterio
import tifffile
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from densevision import open_image
from densevision.errors import (
    ConfigError,
    CorruptImageError,
    DenseVisionError,
    EmptyFileError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidRegionError,
    NotAFileError,
    UnsupportedCompressionError,
    UnsupportedFormatError,
)


def test_sample_facts(data_dir):
    with open_image(data_dir / "wsi/CMU-1-Small-Region.svs") as src:
        assert (src.backend, src.format, src.size, src.level_count) == ("openslide", "aperio", (2220, 2967), 1)
        assert src.mpp == pytest.approx((0.499, 0.499))
        assert (src.band_count, src.dtype, src.crs) == (3, np.uint8, None)
    with open_image(data_dir / "wsi/small.svs") as src:
        assert src.size == (16, 16)
    with open_image(data_dir / "geotiff/RGB.byte.tif") as src:
        assert (src.backend, src.size, src.crs.to_epsg(), src.nodata) == ("rasterio", (791, 718), 32618, 0.0)
    with open_image(data_dir / "geotiff/cogeo.tif") as src:
        assert src.crs.to_epsg() == 3857
        assert src.level_dimensions[:3] == ((1024, 1024), (512, 512), (256, 256))
        assert src.level_downsamples[-1] == pytest.approx(64)
    with open_image(data_dir / "geotiff/RGBA.uint16.tif") as src:
        # The alpha band is validity, not content; BGR order is reported as the file states it.
        assert (src.band_count, src.dtype, src.crs.to_epsg()) == (3, np.uint16, 32612)
        assert src.facts.band_names == ("blue", "green", "red")


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_slide_window_equals_openslide(data_dir, level):
    path = data_dir / "wsi/boxes.tiff"
    with open_image(path) as src, openslide.OpenSlide(path) as ref:
        # Start off-grid and run past the right/bottom edge.
        loc, size = (151, 97), (200, 190)
        region = src.read_region(loc, level, size)
        expected = np.asarray(ref.read_region(loc, level, size))
    assert region.pixels.shape == (190, 200, 3) and region.valid.shape == (190, 200)
    np.testing.assert_array_equal(region.pixels[region.valid], expected[..., :3][expected[..., 3] > 0])
    np.testing.assert_array_equal(region.valid, expected[..., 3] > 0)
    assert not region.valid.all()  # part of the window is outside the image


def test_raster_window_equals_rasterio_and_marks_nodata_and_outside(data_dir):
    path = data_dir / "geotiff/RGB.byte.tif"
    with open_image(path) as src, rasterio.open(path) as ref:
        region = src.read_region((700, 650), 0, (128, 100))
        inside = ref.read(window=Window(700, 650, 91, 68))
        mask = ref.dataset_mask(window=Window(700, 650, 91, 68))
    np.testing.assert_array_equal(region.pixels[:68, :91], np.moveaxis(inside, 0, -1))
    np.testing.assert_array_equal(region.valid[:68, :91], mask > 0)
    assert not region.valid[68:].any() and not region.valid[:, 91:].any()
    assert (region.pixels[68:] == 0).all()


@pytest.mark.parametrize("how", ["alpha", "internal mask", "nodata", "all valid"])
def test_raster_validity_comes_from_alpha_mask_or_nodata_and_pixels_from_every_band(tmp_path, how):
    # A file with nothing that marks pixels invalid is read without GDAL's mask; every other kind keeps it.
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 255, (3, 40, 60), dtype=np.uint8)
    hidden = np.zeros((40, 60), dtype=bool)
    hidden[5:20, 10:30] = True
    path = tmp_path / "scene.tif"
    profile = {
        "driver": "GTiff", "width": 60, "height": 40, "dtype": "uint8", "count": 4 if how == "alpha" else 3,
        "crs": "EPSG:32618", "transform": Affine(10, 0, 500000, 0, -10, 4000000),
    }  # fmt: skip
    if how == "nodata":
        rgb[:, hidden] = 0
        profile["nodata"] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb, [1, 2, 3])
        if how == "alpha":
            dst.write(np.where(hidden, 0, 255).astype(np.uint8), 4)
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
        elif how == "internal mask":
            dst.write_mask(np.where(hidden, 0, 255).astype(np.uint8))
    with open_image(path) as src:
        assert src.backend == "rasterio"
        region = src.read_region((-4, -2), 0, (64, 44))
    assert region.pixels.shape == (44, 64, 3)
    np.testing.assert_array_equal(region.pixels[2:42, 4:64], np.moveaxis(rgb, 0, -1))
    expected = np.zeros((44, 64), dtype=bool)
    expected[2:42, 4:64] = ~hidden if how != "all valid" else True
    np.testing.assert_array_equal(region.valid, expected)


def test_raster_overview_level_window(data_dir):
    path = data_dir / "geotiff/cogeo.tif"
    with open_image(path) as src, rasterio.open(path, overview_level=1) as ref:
        region = src.read_region((512, 256), 2, (64, 64))  # level 2 is overview 1 (factor 4)
        expected = ref.read(window=Window(128, 64, 64, 64))
    np.testing.assert_array_equal(region.pixels, np.moveaxis(expected, 0, -1))


def test_window_entirely_outside_is_all_invalid(data_dir):
    with open_image(data_dir / "geotiff/RGB.byte.tif") as src:
        region = src.read_region((-500, -500), 0, (10, 10))
    assert region.pixels.shape == (10, 10, 3) and not region.valid.any()


def test_all_nodata_raster_reads_as_invalid(data_dir):
    with open_image(data_dir / "geotiff/all-nodata.tif") as src:
        region = src.read_region((0, 0), 0, (71, 300))
    assert not region.valid.any()


@pytest.mark.parametrize("name", ["wsi/boxes.tiff", "geotiff/cogeo.tif"])
def test_bad_level_and_size(data_dir, name):
    with open_image(data_dir / name) as src:
        with pytest.raises(InvalidRegionError, match="level 9 does not exist"):
            src.read_region((0, 0), 9, (10, 10))
        with pytest.raises(InvalidRegionError, match="level -1"):
            src.read_region((0, 0), -1, (10, 10))
        for size in [(0, 10), (10, -3)]:
            with pytest.raises(InvalidRegionError, match="must be positive"):
                src.read_region((0, 0), 0, size)


@pytest.mark.parametrize(
    "name,error",
    [
        ("bad/broken.svs", UnsupportedFormatError),
        ("bad/unopenable.tiff", UnsupportedCompressionError),
        ("bad/truncated_image.png", CorruptImageError),
        ("bad/oom-dimensions.tif", ImageTooLargeError),
        ("bad/does-not-exist.svs", ImageNotFoundError),
    ],
)
def test_bad_files_have_their_own_error(data_dir, name, error):
    with pytest.raises(error) as exc:
        open_image(data_dir / name)
    assert type(exc.value) is error and isinstance(exc.value, DenseVisionError)
    message = str(exc.value)
    assert name.split("/")[-1] in message and "\n" not in message


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(NotAFileError):
        open_image(tmp_path)
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(EmptyFileError):
        open_image(empty)


def test_unicode_path(data_dir, tmp_path):
    target = tmp_path / "Gewebe-schnitt_组织_é.svs"
    shutil.copy(data_dir / "wsi/small.svs", target)
    with open_image(target) as src:
        assert src.size == (16, 16)
        assert src.read_region((0, 0), 0, (16, 16)).valid.all()


def _write_raster(path, transform, crs="EPSG:32633"):
    data = np.arange(3 * 20 * 30, dtype=np.uint8).reshape(3, 20, 30)
    profile = dict(driver="GTiff", width=30, height=20, count=3, dtype="uint8", transform=transform)
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return data


def test_raster_without_crs_says_so(tmp_path):
    path = tmp_path / "nocrs.tif"
    data = _write_raster(path, Affine.translation(100, 200) @ Affine.scale(2, -2), crs=None)
    with open_image(path) as src:
        assert src.backend == "rasterio" and src.crs is None
        assert any("no CRS" in n for n in src.facts.notes)
        np.testing.assert_array_equal(src.read_region((0, 0), 0, (30, 20)).pixels, np.moveaxis(data, 0, -1))


def test_rotated_transform_is_kept_and_noted(tmp_path):
    path = tmp_path / "rotated.tif"
    transform = Affine.translation(500000, 4000000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    _write_raster(path, transform)
    with open_image(path) as src:
        assert src.transform.almost_equals(transform)
        assert any("rotated" in n for n in src.facts.notes)


def test_corrupt_tile_in_the_middle_is_named_and_the_handle_recovers(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    path = tmp_path / "one-bad-tile.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages.first.dataoffsets[4], tif.pages.first.databytecounts[4]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = bytes(count)  # tile (row 1, col 1) no longer decodes
    path.write_bytes(bytes(raw))
    with open_image(path) as src:
        assert src.backend == "openslide"
        with pytest.raises(CorruptImageError, match=r"window at \(256, 256\)"):
            src.read_region((256, 256), 0, (256, 256))
        # OpenSlide errors are sticky; the source reopened its handle, so other tiles still read.
        good = src.read_region((0, 0), 0, (256, 256))
        assert good.valid.all() and abs(float(good.pixels.mean()) - float(img[:256, :256].mean())) < 2


def test_float_raster_nan_is_invalid(tmp_path):
    path = tmp_path / "float.tif"
    data = np.ones((2, 20, 30), dtype=np.float32)
    data[1, 5:8, 10:12] = np.nan
    transform = Affine.translation(500000, 4000000) @ Affine.scale(10, -10)
    with rasterio.open(
        path, "w", driver="GTiff", width=30, height=20, count=2, dtype="float32", crs="EPSG:32633", transform=transform
    ) as dst:
        dst.write(data)
    with open_image(path) as src:
        region = src.read_region((0, 0), 0, (30, 20))
        assert src.dtype == np.float32
        assert not region.valid[5:8, 10:12].any() and region.valid.sum() == 600 - 6
        assert not src.thumbnail(30).valid[5:8, 10:12].any()


def test_band_selection_and_order(data_dir):
    path = data_dir / "geotiff/RGBA.uint16.tif"
    with open_image(path, bands=(3, 2, 1)) as src, rasterio.open(path) as ref:
        assert src.band_count == 3 and src.facts.band_names == ("red", "green", "blue")
        region = src.read_region((10, 20), 0, (40, 30))
        expected = ref.read((3, 2, 1), window=Window(10, 20, 40, 30))
    np.testing.assert_array_equal(region.pixels, np.moveaxis(expected, 0, -1))
    with pytest.raises(ConfigError, match=r"within 1\.\.4"):
        open_image(path, bands=(5,))
    with pytest.raises(ConfigError, match="applies to rasters"):
        open_image(data_dir / "wsi/small.svs", bands=(2,))
