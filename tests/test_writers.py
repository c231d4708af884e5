"""Output writers: round trips through rasterio, OpenSlide, tifffile, densevision.open_image and pycocotools, at
awkward sizes (windows not aligned to tiles, ragged last windows), and crash safety (nothing left on failure)."""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest
import rasterio
import tifffile
from affine import Affine
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

import densevision
from densevision.errors import InvalidRegionError, OutputError
from densevision.io import atomic
from densevision.io.writers import (
    CocoResultsWriter,
    GeoJsonWriter,
    GeoTiffWriter,
    PyramidTiffWriter,
    mask_to_rle,
    pyramid_dimensions,
    scale_transform,
    write_coco_results,
    write_geojson,
)
from densevision.io.writers.pyramid import halve

pytestmark = [
    # pycocotools' decode under numpy 2, and reading back outputs written without georeferencing on purpose.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning"),
]

# Output size deliberately not a multiple of any tile size; windows of 150 x 110 cross 256-pixel tiles.
W, H = 613, 427


def class_map(h: int = H, w: int = W, classes: int = 5) -> np.ndarray:
    """``h x w`` uint8 stripes and blocks of ``classes`` values (compressible, but every tile differs)."""
    rows, cols = np.mgrid[0:h, 0:w]
    return ((rows // 37 + cols // 53 + (rows * cols) % 3) % classes).astype(np.uint8)


def windows(h: int, w: int, wh: int = 110, ww: int = 150) -> list[tuple[int, int, int, int]]:
    """``(x, y, w, h)`` windows in row-major order; the last row and column are ragged."""
    return [(x, y, min(ww, w - x), min(wh, h - y)) for y in range(0, h, wh) for x in range(0, w, ww)]


@pytest.fixture(scope="module")
def rgb_byte(data_dir: Path) -> rasterio.DatasetReader:
    with rasterio.open(data_dir / "geotiff" / "RGB.byte.tif") as ds:
        yield ds


# --- GeoTIFF ---------------------------------------------------------------------------------------------------


def test_scale_transform_keeps_corners() -> None:
    t = Affine(300.0, 0.0, 101985.0, 0.0, -300.0, 2826915.0)
    assert scale_transform(t, 2) == t @ Affine.scale(2, 2)
    # A level of 250 x 175 from 1001 x 699: non-integer, per-axis factors.
    s = scale_transform(t, (1001 / 250, 699 / 175))
    assert s @ (0, 0) == t @ (0, 0)
    assert s @ (250, 175) == pytest.approx(t @ (1001, 699))
    assert s @ (1, 1) == pytest.approx(t @ (1001 / 250, 699 / 175))


@pytest.mark.parametrize("kind", ["classes", "probabilities"])
def test_geotiff_round_trip(tmp_path: Path, rgb_byte: rasterio.DatasetReader, kind: str) -> None:
    transform = scale_transform(rgb_byte.transform, (rgb_byte.width / W, rgb_byte.height / H))
    out = tmp_path / "out.tif"
    if kind == "classes":
        data = class_map()[..., None]
        names = ["background", "water", "field", "forest", "urban"]
        kwargs = dict(nodata=255, colormap={1: (0, 0, 255, 255), 4: (255, 0, 0, 255)}, class_names=names)
    else:
        data = np.random.default_rng(0).random((H, W, 3), dtype=np.float32)
        data[:5, :7] = np.nan
        kwargs = dict(nodata=float("nan"), band_descriptions=["water", "field", "forest"])
    with GeoTiffWriter(
        out, W, H, data.shape[2], data.dtype, crs=rgb_byte.crs, transform=transform, block_size=256, **kwargs
    ) as w:
        for x, y, ww, wh in windows(H, W):
            window = data[y : y + wh, x : x + ww]
            w.write(window[..., 0] if kind == "classes" else window, x, y)  # H x W for one band, else H x W x C
    assert sorted(os.listdir(tmp_path)) == ["out.tif"]
    with rasterio.open(out) as ds:
        assert ds.crs == rgb_byte.crs
        assert ds.transform == transform
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.compression.value == "DEFLATE"
        np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), data)
        if kind == "classes":
            assert ds.nodata == 255
            assert ds.colormap(1)[4] == (255, 0, 0, 255)
            assert json.loads(ds.tags()["CLASS_NAMES"]) == {str(i): n for i, n in enumerate(names)}
        else:
            assert np.isnan(ds.nodata)
            assert ds.descriptions == ("water", "field", "forest")


def test_geotiff_without_crs(tmp_path: Path) -> None:
    with GeoTiffWriter(tmp_path / "plain.tif", 40, 30) as w:
        w.write(np.ones((30, 40), np.uint8), 0, 0)
    with rasterio.open(tmp_path / "plain.tif") as ds:
        assert ds.crs is None
        assert ds.transform == Affine.identity()
    t = Affine(0.5, 0, 10, 0, -0.5, 20)
    with GeoTiffWriter(tmp_path / "pixels.tif", 40, 30, transform=t) as w:
        w.write(np.ones((30, 40), np.uint8), 0, 0)
    with rasterio.open(tmp_path / "pixels.tif") as ds:
        assert ds.crs is None
        assert ds.transform == t


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_geotiff_cog_layout(tmp_path: Path, rgb_byte: rasterio.DatasetReader, dtype: type) -> None:
    data = class_map() if dtype == np.uint8 else class_map().astype(np.float32) / 4
    out = tmp_path / "cog.tif"
    with GeoTiffWriter(
        out, W, H, 1, dtype, crs=rgb_byte.crs, transform=rgb_byte.transform, block_size=128, cog=True
    ) as w:
        for x, y, ww, wh in windows(H, W):
            w.write(data[y : y + wh, x : x + ww], x, y)
    assert sorted(os.listdir(tmp_path)) == ["cog.tif"]
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.overviews(1) == [2, 4, 8]  # until the overview fits in one 128-pixel block
        assert ds.block_shapes[0] == (128, 128)
        assert ds.crs == rgb_byte.crs and ds.transform == rgb_byte.transform
        np.testing.assert_array_equal(ds.read(1), data)
        overview = ds.read(1, out_shape=(H // 4, W // 4))
    if dtype == np.uint8:  # mode resampling: only classes that exist
        assert set(np.unique(overview)) <= set(range(5))
    else:  # average resampling: values between classes appear
        assert not np.isin(overview, np.arange(5) / 4).all()


@pytest.mark.parametrize("how", ["once", "a window twice", "pixels never written"])
def test_a_class_map_cogs_overviews_are_built_as_its_windows_come(
    tmp_path: Path, rgb_byte: rasterio.DatasetReader, how: str
) -> None:
    # Every pixel once: the overviews are the class map halved by mode level after level (the pyramid TIFF's
    # halving), staged as the windows come, and the COG copy takes them as they are, with the colour table, nodata,
    # class names and georeferencing of the class map. Otherwise GDAL computes them at close, as before.
    data = class_map()
    names = ["background", "water", "field", "forest", "urban"]
    out = tmp_path / "cog.tif"
    geo = {"crs": rgb_byte.crs, "transform": rgb_byte.transform}
    with GeoTiffWriter(
        out, W, H, 1, np.uint8, nodata=255, colormap={1: (0, 0, 255, 255)}, class_names=names, block_size=128,
        cog=True, **geo,
    ) as w:  # fmt: skip
        for x, y, ww, wh in windows(H, W):
            if how == "pixels never written" and (x, y) == (0, 0):
                continue
            w.write(data[y : y + wh, x : x + ww], x, y)
        if how == "a window twice":
            w.write(data[:110, :150], 0, 0)
        staged = sorted(p.name for p in tmp_path.iterdir() if ".ov" in p.name)
        levels_staged = ["cog.tif.ov1.partial", "cog.tif.ov2.partial", "cog.tif.ov3.partial"]
        assert staged == ([] if how == "a window twice" else levels_staged)
    assert sorted(os.listdir(tmp_path)) == ["cog.tif"]  # no staging file, no VRT left
    expected = data.copy()
    if how == "pixels never written":
        expected[:110, :150] = 255  # nodata
    levels = [expected[..., None]]
    for _ in range(3):
        levels.append(halve(levels[-1], "mode"))
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.overviews(1) == [2, 4, 8]
        assert ds.crs == rgb_byte.crs and ds.transform == rgb_byte.transform and ds.nodata == 255
        assert ds.colormap(1)[1] == (0, 0, 255, 255) and json.loads(ds.tags()["CLASS_NAMES"])["4"] == "urban"
        np.testing.assert_array_equal(ds.read(1), expected)
    for i in range(3):
        with rasterio.open(out, overview_level=i) as ov:
            got = ov.read(1)
        assert set(np.unique(got)) <= {*range(5), 255}
        if how == "once":
            np.testing.assert_array_equal(got, levels[i + 1][..., 0])  # ceil(size / 2) a level, as in a pyramid TIFF
        else:  # GDAL's own: floor(size / 2) here
            assert got.shape == (H >> (i + 1), W >> (i + 1))


def test_geotiff_rejects_bad_windows(tmp_path: Path) -> None:
    with GeoTiffWriter(tmp_path / "x.tif", 100, 80, 2, np.uint8) as w:
        with pytest.raises(InvalidRegionError, match="leaves the 100 x 80 output"):
            w.write(np.zeros((10, 10, 2), np.uint8), 95, 0)
        with pytest.raises(InvalidRegionError, match="H x W x 2"):
            w.write(np.zeros((10, 10), np.uint8), 0, 0)
        with pytest.raises(InvalidRegionError, match="float64"):
            w.write(np.zeros((10, 10, 2)), 0, 0)
        with pytest.raises(InvalidRegionError, match="do not fit"):
            w.write(np.full((10, 10, 2), 300), 0, 0)
        w.write(np.full((10, 10, 2), 7, dtype=np.int64), 0, 0)  # in range: cast
    with rasterio.open(tmp_path / "x.tif") as ds:
        assert ds.read(1)[0, 0] == 7


# --- pyramidal TIFF ----------------------------------------------------------------------------------------------


def test_halve_mode_is_the_most_frequent_of_every_2x2_with_the_earliest_winning_ties() -> None:
    quads = np.array(list(itertools.product(range(4), repeat=4)), dtype=np.uint8)  # every 2 x 2 of 4 values
    a = np.zeros((2, 2 * len(quads), 1), np.uint8)
    a[0, 0::2, 0], a[0, 1::2, 0], a[1, 0::2, 0], a[1, 1::2, 0] = quads.T
    votes = (quads[:, :, None] == quads[:, None, :]).sum(axis=2)  # how often each of the four occurs
    expected = quads[np.arange(len(quads)), votes.argmax(axis=1)]  # argmax: the first of the most frequent
    np.testing.assert_array_equal(halve(a, "mode")[0, :, 0], expected)


def test_halve_hand_computed() -> None:
    a = np.array([[1, 1, 2, 3, 9], [2, 3, 3, 4, 8], [5, 6, 7, 7, 7]], np.uint8)[..., None]
    # 2 x 2 blocks: {1,1,2,3} -> 1; {2,3,3,4} -> 3; {9,8,9,8} (edge repeated) -> 9 (tie: top-left);
    # bottom row repeated: {5,6,5,6} -> 5; {7,7,7,7} -> 7; {7,7,7,7} -> 7.
    assert halve(a, "mode")[..., 0].tolist() == [[1, 3, 9], [5, 7, 7]]
    assert halve(a, "nearest")[..., 0].tolist() == [[1, 2, 9], [5, 7, 7]]
    assert halve(a, "mean")[..., 0].tolist() == [[2, 3, 9], [6, 7, 7]]  # round(sum / 4): 7 -> 2, 12 -> 3, 34 -> 9


def test_pyramid_tiff_opens_in_openslide_and_open_image(tmp_path: Path) -> None:
    classes = class_map()
    out = tmp_path / "mask.tiff"
    with PyramidTiffWriter(out, W, H, mpp=0.2527, tile_size=128) as w:
        y = 0
        for band_height in (100, 128, 7, 150, H - 385):  # heights unrelated to the tile size
            w.write(classes[y : y + band_height], 0, y)
            y += band_height
    expected_dims = [(613, 427), (307, 214), (154, 107), (77, 54)]
    assert pyramid_dimensions(W, H, 128) == expected_dims
    assert sorted(os.listdir(tmp_path)) == ["mask.tiff"]

    slide = openslide.OpenSlide(out)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_dimensions == tuple(expected_dims)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.2527, rel=1e-6)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.2527, rel=1e-6)
    slide.close()

    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 4 and all(p.is_tiled and p.compression == 8 for p in tif.pages)
        np.testing.assert_array_equal(tif.pages[0].asarray(), classes)
        level1 = tif.pages[1].asarray()
    np.testing.assert_array_equal(level1, halve(classes[..., None], "mode")[..., 0])

    with densevision.open_image(out) as src:
        assert src.level_dimensions == tuple(expected_dims)
        assert src.mpp == pytest.approx((0.2527, 0.2527))
        region = src.read_region((301, 99), 0, (57, 41))
        np.testing.assert_array_equal(region.pixels[..., 0], classes[99:140, 301:358])
        assert region.valid.all()
        # Level 1 is 307 x 214: its downsample is not exactly 2, so compare it whole rather than at an offset.
        np.testing.assert_array_equal(src.read_region((0, 0), 1, (307, 214)).pixels[..., 0], level1)


def test_pyramid_tiff_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    with PyramidTiffWriter(tmp_path / "rgb.tiff", 90, 70, samples=3, mpp=(0.5, 0.5), tile_size=32) as w:
        w.write(rgb[:33], 0, 0)
        w.write(rgb[33:], 0, 33)
    slide = openslide.OpenSlide(tmp_path / "rgb.tiff")
    assert slide.level_dimensions == ((90, 70), (45, 35), (23, 18))
    np.testing.assert_array_equal(np.asarray(slide.read_region((0, 0), 0, (90, 70)))[..., :3], rgb)
    slide.close()


def test_pyramid_tiff_smaller_than_one_tile(tmp_path: Path) -> None:
    classes = class_map(3, 5)
    with PyramidTiffWriter(tmp_path / "tiny.tiff", 5, 3, mpp=1.0, tile_size=16) as w:
        w.write(classes, 0, 0)
    slide = openslide.OpenSlide(tmp_path / "tiny.tiff")
    assert slide.level_dimensions == ((5, 3),)
    np.testing.assert_array_equal(np.asarray(slide.read_region((0, 0), 0, (5, 3)))[..., 0], classes)
    slide.close()


def test_pyramid_tiff_windows_in_any_order_give_the_bytes_of_whole_width_bands(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for samples in (1, 3):
        pixels = class_map() if samples == 1 else rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        kw = {"samples": samples, "mpp": 0.5, "tile_size": 64}
        with PyramidTiffWriter(tmp_path / "bands.tiff", W, H, **kw) as w:
            for y in range(0, H, 100):
                w.write(pixels[y : y + 100], 0, y)
        shuffled = windows(H, W)
        rng.shuffle(shuffled)
        with PyramidTiffWriter(tmp_path / "windows.tiff", W, H, **kw) as w:
            for x, y, ww, wh in shuffled:  # 150 x 110 windows cross the 64-pixel tiles
                w.write(pixels[y : y + wh, x : x + ww], x, y)
            assert w.held_tiles == 0  # every tile of every level was complete, encoded and freed
        assert (tmp_path / "bands.tiff").read_bytes() == (tmp_path / "windows.tiff").read_bytes(), samples
        with tifffile.TiffFile(tmp_path / "windows.tiff") as tif:
            np.testing.assert_array_equal(tif.pages[0].asarray(), pixels)


def test_pyramid_tiff_in_column_strips_holds_a_strip_not_the_width(tmp_path: Path) -> None:
    w, h, t, strip = 4096, 700, 32, 256
    pixels = class_map(h, w)
    most = 0
    with PyramidTiffWriter(tmp_path / "strips.tiff", w, h, tile_size=t) as writer:
        for x0 in range(0, w, strip):
            for y0 in range(0, h, 45):  # bands not aligned to the tiles
                writer.write(pixels[y0 : y0 + 45, x0 : x0 + strip], x0, y0)
                most = max(most, writer.held_tiles)
    # Levels 0..3 hold at most two rows of a strip's tiles (2 x 8 + 2 x 4 + ...); deeper levels, whose tiles are wider
    # than the strip, a column of tiles (700 / 2**4 / 32 -> 2, ...). The width's 128 tiles per row never are.
    assert most <= 2 * (8 + 4 + 2 + 1) + 2 * 4, most
    with tifffile.TiffFile(tmp_path / "strips.tiff") as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), pixels)
        np.testing.assert_array_equal(tif.pages[1].asarray(), halve(pixels[..., None], "mode")[..., 0])


def test_pyramid_tiff_refuses_bad_windows_pixels_twice_and_incomplete(tmp_path: Path) -> None:
    out = tmp_path / "p.tiff"
    w = PyramidTiffWriter(out, 64, 48, tile_size=16)
    with pytest.raises(InvalidRegionError, match="leaves the 64 x 48 image"):
        w.write(np.zeros((8, 8), np.uint8), 60, 0)
    with pytest.raises(InvalidRegionError, match=r"expected an H x W x 1"):
        w.write(np.zeros((8, 8, 3), np.uint8), 0, 0)
    w.write(np.zeros((16, 64), np.uint8), 0, 0)  # the first row of tiles: complete
    with pytest.raises(InvalidRegionError, match="came twice"):
        w.write(np.zeros((4, 4), np.uint8), 3, 3)
    w.write(np.zeros((8, 8), np.uint8), 0, 16)
    with pytest.raises(InvalidRegionError, match="more pixels than it has"):
        w.write(np.zeros((16, 16), np.uint8), 0, 16)
    w.abort()
    w = PyramidTiffWriter(out, 64, 48, tile_size=16)
    w.write(np.zeros((8, 64), np.uint8), 0, 0)
    with pytest.raises(InvalidRegionError, match="2560 of 3072 pixels were never written"):
        w.close()
    assert os.listdir(tmp_path) == []


# --- GeoJSON -----------------------------------------------------------------------------------------------------


def test_geojson_wgs84_lands_on_the_crs_coordinate(tmp_path: Path, rgb_byte: rasterio.DatasetReader) -> None:
    t, crs = rgb_byte.transform, rgb_byte.crs
    out = tmp_path / "ships.geojson"
    n = write_geojson(
        out,
        [({"type": "Point", "coordinates": (412, 287)}, {"score": np.float32(0.75)}), ([10, 20, 30, 50], None)],
        transform=t,
        crs=crs,
    )
    assert n == 2
    fc = json.loads(out.read_text())
    assert "crs" not in fc  # RFC 7946: WGS84 implied
    point, box = fc["features"]
    x, y = t @ (412, 287)
    lon, lat = warp_transform(crs, "EPSG:4326", [x], [y])
    assert point["geometry"]["coordinates"] == pytest.approx([lon[0], lat[0]], abs=1e-9)
    assert -80 < lon[0] < -76 and 23 < lat[0] < 26  # the scene is off the Bahamas
    assert point["properties"] == {"score": 0.75}
    ring = box["geometry"]["coordinates"][0]
    corners = [t @ c for c in [(10, 20), (30, 20), (30, 50), (10, 50)]]
    lons, lats = warp_transform(crs, "EPSG:4326", [c[0] for c in corners], [c[1] for c in corners])
    assert sorted(map(tuple, np.round(ring[:4], 9))) == sorted(zip(np.round(lons, 9), np.round(lats, 9), strict=True))
    # Exterior ring counter-clockwise (positive shoelace area) in lon/lat.
    xs, ys = np.array(ring).T
    assert np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]) > 0


def test_geojson_native_crs(tmp_path: Path, rgb_byte: rasterio.DatasetReader) -> None:
    out = tmp_path / "native.geojson"
    with GeoJsonWriter(out, transform=rgb_byte.transform, crs=rgb_byte.crs, native_crs=True) as w:
        w.add({"type": "Point", "coordinates": (412.5, 287.0)}, {"label": "ship"}, id=41)
    fc = json.loads(out.read_text())
    assert CRS.from_user_input(fc["crs"]["properties"]["name"]) == CRS.from_epsg(32618)
    (feature,) = fc["features"]
    assert feature["id"] == 41
    assert feature["geometry"]["coordinates"] == pytest.approx(list(rgb_byte.transform @ (412.5, 287.0)))


def test_geojson_qupath_features(tmp_path: Path) -> None:
    out = tmp_path / "cells.geojson"
    with GeoJsonWriter(out, batch_size=3) as w:  # several flushes
        for i in range(7):
            w.add_qupath(
                [10 * i, 20, 10 * i + 8, 28],
                object_type="detection",
                classification="Tumor",
                color=(200, 0, 0),
                measurements={"score": 0.5 + i / 20},
                id=1000 + i,
            )
        w.add_qupath(
            {"type": "Polygon", "coordinates": [[(0, 0), (100, 0), (100, 60), (0, 0)]]}, object_type="annotation"
        )
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    features = fc["features"]
    assert len(features) == 8
    first = features[0]
    assert set(first) == {"type", "id", "geometry", "properties"}
    assert uuid.UUID(first["id"]).version == 5
    assert first["properties"] == {
        "objectType": "detection",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "measurements": {"score": 0.5},
    }
    xs, ys = np.array(first["geometry"]["coordinates"][0]).T  # level-0 pixels, untouched
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 20, 8, 28)
    assert features[-1]["properties"]["objectType"] == "annotation"
    assert len({f["id"] for f in features}) == 8
    # The same global ids give the same UUIDs on a rerun.
    with GeoJsonWriter(tmp_path / "again.geojson") as w:
        w.add_qupath([0, 20, 8, 28], id=1000)
    assert json.loads((tmp_path / "again.geojson").read_text())["features"][0]["id"] != first["id"]  # other file
    with GeoJsonWriter(tmp_path / "cells.geojson") as w:
        w.add_qupath([0, 20, 8, 28], id=1000)
    assert json.loads(out.read_text())["features"][0]["id"] == first["id"]


def test_geojson_refuses_nan_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN"), GeoJsonWriter(tmp_path / "bad.geojson") as w:
        w.add([0, 0, 1, 1], {"score": float("nan")})
    assert os.listdir(tmp_path) == []


def test_geojson_empty_collection(tmp_path: Path) -> None:
    with GeoJsonWriter(tmp_path / "none.geojson"):
        pass
    assert json.loads((tmp_path / "none.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


# --- COCO results ------------------------------------------------------------------------------------------------


def coco_cases() -> list[tuple[np.ndarray, tuple[int, int]]]:
    m = np.zeros((50, 40), bool)
    m[10:50, 5:7] = True  # touches the crop's bottom ...
    m[0:3, 7] = True  # ... and the next column starts at the crop's top
    m[20:30, 30:35] = True
    full = np.ones((30, 20), bool)
    return [(m, (40, 50)), (m, (0, 0)), (np.zeros((5, 5), bool), (3, 4)), (full, (0, 0))]


@pytest.mark.parametrize("case", range(4))
def test_mask_to_rle_matches_pycocotools(case: int) -> None:
    mask, (x0, y0) = coco_cases()[case]
    size = (80, 100) if case < 3 else (20, 30)
    full = np.zeros(size[::-1], np.uint8)
    full[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    rle = mask_to_rle(mask, (x0, y0), size)
    reference = mask_utils.encode(np.asfortranarray(full))
    assert rle == {"size": [size[1], size[0]], "counts": reference["counts"].decode()}
    np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), full)


def test_coco_results_load_in_pycocotools(tmp_path: Path) -> None:
    mask, origin = coco_cases()[0]
    out = tmp_path / "results.json"
    n = write_coco_results(
        out,
        [
            {"image_id": 1, "category_id": 3, "score": np.float32(0.9), "mask": mask, "mask_origin": origin,
             "image_size": (80, 100)},
            {"image_id": 1, "category_id": 2, "score": 0.4, "bbox": [1, 2, 3, 4]},
        ],
    )  # fmt: skip
    assert n == 2
    results = json.loads(out.read_text())
    assert results[0]["bbox"] == [45.0, 50.0, 30.0, 50.0]  # from the mask: x 45..75, y 50..100
    assert isinstance(results[0]["segmentation"]["counts"], str)
    assert "segmentation" not in results[1]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 80, "height": 100}],
        "categories": [{"id": 2, "name": "a"}, {"id": 3, "name": "b"}],
        "annotations": [],
    }
    gt.createIndex()
    dt = gt.loadRes(str(out))
    ann = dt.loadAnns(dt.getAnnIds(catIds=[3]))[0]
    full = np.zeros((100, 80), np.uint8)
    full[50:, 40:] = mask
    np.testing.assert_array_equal(dt.annToMask(ann), full)


# --- crash safety and bad paths ----------------------------------------------------------------------------------

Opener = Callable[[Path], atomic.AtomicWriter]
WRITERS: dict[str, tuple[str, Opener]] = {
    "geotiff": ("out.tif", lambda p: GeoTiffWriter(p, 64, 48)),
    "cog": ("out.tif", lambda p: GeoTiffWriter(p, 64, 48, cog=True)),
    "pyramid": ("out.tiff", lambda p: PyramidTiffWriter(p, 64, 48, tile_size=16)),
    "geojson": ("out.geojson", lambda p: GeoJsonWriter(p)),
    "coco": ("out.json", lambda p: CocoResultsWriter(p)),
}


def _write_something(w: atomic.AtomicWriter) -> None:
    if isinstance(w, (GeoTiffWriter, PyramidTiffWriter)):
        w.write(np.ones((16, 64), np.uint8), 0, 0)
    elif isinstance(w, GeoJsonWriter):
        w.add([0, 0, 1, 1], {"a": 1})
    elif isinstance(w, CocoResultsWriter):
        w.add(1, 1, 0.5, [0, 0, 1, 1])


@pytest.mark.parametrize("kind", WRITERS)
def test_exception_leaves_nothing(tmp_path: Path, kind: str) -> None:
    name, opener = WRITERS[kind]
    with pytest.raises(RuntimeError, match="model crashed"), opener(tmp_path / name) as w:
        _write_something(w)
        raise RuntimeError("model crashed")
    assert os.listdir(tmp_path) == []
    # An existing result is kept until a complete new one replaces it.
    (tmp_path / name).write_text("previous run")
    with pytest.raises(RuntimeError), opener(tmp_path / name) as w:
        _write_something(w)
        raise RuntimeError("model crashed")
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == "previous run"


@pytest.mark.parametrize("kind", WRITERS)
def test_bad_output_paths(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, opener = WRITERS[kind]
    with pytest.raises(OutputError, match="is a directory"):
        opener(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        opener(tmp_path / "file" / name)
    with pytest.raises(OutputError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        opener(tmp_path / "file" / "deeper" / name)
    (tmp_path / "file").unlink()
    assert issubclass(OutputError, OSError)
    # Root may write anywhere, so fake the permission check rather than chmod.
    monkeypatch.setattr(atomic.os, "access", lambda *a, **k: False)
    with pytest.raises(OutputError, match="is not writable"):
        opener(tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_writing_after_close_is_refused(tmp_path: Path) -> None:
    w = GeoJsonWriter(tmp_path / "a.geojson")
    assert w.close() == tmp_path / "a.geojson"
    assert w.close() == tmp_path / "a.geojson"  # idempotent
    with pytest.raises(OutputError, match="already closed"):
        w.add([0, 0, 1, 1])


@pytest.mark.parametrize("kind", WRITERS)
def test_missing_output_folders_are_created(tmp_path: Path, kind: str) -> None:
    name, opener = WRITERS[kind]
    out = tmp_path / "new" / "deeper" / name
    with opener(out) as w:
        if isinstance(w, (GeoTiffWriter, PyramidTiffWriter)):
            w.write(np.ones((48, 64), np.uint8), 0, 0)  # every pixel, or nothing is saved
        else:
            _write_something(w)
    assert out.is_file() and os.listdir(out.parent) == [name]


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputError) as err:
        atomic.check_output_path(tmp_path / "new" / "out.tif")
    assert str(err.value) == (
        f"{tmp_path / 'new' / 'out.tif'}: cannot create the output directory {tmp_path / 'new'} (Permission denied); "
        "choose another -o or fix permissions"
    )


def test_replacing_renames_on_success_and_removes_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "a.txt"
    out.write_text("previous")
    with pytest.raises(RuntimeError), atomic.replacing(out) as partial:
        assert partial == tmp_path / "a.txt.partial"
        partial.write_text("half")
        raise RuntimeError("crashed")
    assert os.listdir(tmp_path) == ["a.txt"] and out.read_text() == "previous"
    (tmp_path / "a.txt.partial").write_text("left by a killed run")
    with atomic.replacing(out) as partial:
        assert not partial.exists()  # the stale partial is gone first
        partial.write_text("new")
    assert os.listdir(tmp_path) == ["a.txt"] and out.read_text() == "new"


def test_replacing_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.pth").write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing(out) as partial:
        partial.mkdir()
        (partial / "new.pth").write_text("half")
        raise RuntimeError("crashed")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(out) == ["old.pth"]
    with atomic.replacing(out) as partial:
        partial.mkdir()
        (partial / "new.pth").write_text("new")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(out) == ["new.pth"]


def test_write_json_is_whole_or_absent(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    assert atomic.write_json(out, {"count": np.int64(3), "boxes": np.zeros((1, 2))}) == out
    assert json.loads(out.read_text()) == {"count": 3, "boxes": [[0.0, 0.0]]}
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        atomic.write_json(out, {"bad": object()})
    assert os.listdir(tmp_path) == ["summary.json"] and json.loads(out.read_text())["count"] == 3
