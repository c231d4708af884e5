"""Generated big images: OpenSlide / rasterio read them as asked, planted objects sit at their boxes (and cover the
same pixels whatever window asks), memory stays bounded while writing."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
import rasterio

import densevision
from densevision.errors import ConfigError
from densevision.samples import GEOTIFF, SLIDE, sample_path
from densevision.synthetic.planted import Planted, exact_objects, scatter_objects
from densevision.synthetic.rasters import make_geotiff
from densevision.synthetic.slides import make_slide

W, H, T = 1500, 1100, 256  # awkward sizes: partial edge tiles, odd level sizes below


@pytest.fixture(scope="module")
def sources() -> tuple[Path, Path]:
    return sample_path(SLIDE), sample_path(GEOTIFF)  # shipped with the package


PLANT = [
    {"x0": 100, "y0": 120, "x1": 180, "y1": 170, "color": (0, 160, 0), "label": "box"},
    {"x0": 300, "y0": 300, "x1": 341, "y1": 360, "shape": "ellipse", "color": (20, 20, 220)},
    Planted(1460, 1050, 1600, 1200, color=(230, 200, 0)),  # runs off the bottom-right corner: clipped
]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory, sources: tuple[Path, Path]) -> tuple[Path, list[Planted]]:
    path = tmp_path_factory.mktemp("synthetic") / "slide.tiff"
    planted = make_slide(path, W, H, source=sources[0], tile_size=T, mpp=0.25, seed=3, plant=PLANT)
    return path, planted


def test_slide_opens_as_generic_tiff_pyramid(slide: tuple[Path, list[Planted]]) -> None:
    path, _ = slide
    assert not path.with_name(path.name + ".partial").exists()
    assert not path.with_name(path.name + ".spool.partial").exists()
    with openslide.OpenSlide(path) as s:
        assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert s.level_dimensions == ((1500, 1100), (750, 550), (375, 275), (188, 138))
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        assert s.properties["openslide.level[0].tile-width"] == str(T)
    with densevision.open_image(path) as src:
        assert src.backend == "openslide"
        assert src.mpp == pytest.approx((0.25, 0.25))
        assert src.level_count == 4


def test_slide_reads_equal_openslide(slide: tuple[Path, list[Planted]]) -> None:
    path, _ = slide
    with openslide.OpenSlide(path) as s, densevision.open_image(path) as src:
        for location, level, size in [((37, 51), 0, (300, 200)), ((1400, 1000), 0, (150, 130)), ((3, 5), 2, (90, 70))]:
            expected = np.asarray(s.read_region(location, level, size))
            region = src.read_region(location, level, size)
            np.testing.assert_array_equal(region.pixels, expected[..., :3])
            np.testing.assert_array_equal(region.valid, expected[..., 3] > 0)


def test_slide_has_tissue_and_glass(slide: tuple[Path, list[Planted]]) -> None:
    with densevision.open_image(slide[0]) as src:
        thumb = src.thumbnail(256).pixels.astype(int)
    tissue = (thumb.mean(axis=2) < 200) & (thumb.max(axis=2) - thumb.min(axis=2) > 25)
    assert 0.02 < tissue.mean() < 0.8


def test_slide_is_deterministic(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    a, b, c = tmp_path / "a.tiff", tmp_path / "b.tiff", tmp_path / "c.tiff"
    make_slide(a, 300, 200, source=sources[0], tile_size=128, seed=1)
    make_slide(b, 300, 200, source=sources[0], tile_size=128, seed=1)
    make_slide(c, 300, 200, source=sources[0], tile_size=128, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    make_slide(b, 300, 200, tile_size=128, seed=1)  # the default source: the shipped sample
    assert b.read_bytes() == a.read_bytes()


def test_planted_objects_at_exact_boxes(slide: tuple[Path, list[Planted]]) -> None:
    path, planted = slide
    rect, ellipse, corner = planted
    assert rect.box == (100, 120, 180, 170) and rect.label == "box"
    assert corner.box == (1460, 1050, 1500, 1100)  # clipped to the image
    x0, y0, x1, y1 = ellipse.box
    assert x0 >= 300 and y0 >= 300 and x1 <= 341 and y1 <= 360
    with densevision.open_image(path) as src:
        for obj in planted:
            # JPEG (2 x 2 chroma subsampling): compare away from the edge, with a tolerance.
            region = src.read_region((obj.x0 - 8, obj.y0 - 8), 0, (obj.x1 - obj.x0 + 16, obj.y1 - obj.y0 + 16))
            pix = region.pixels.astype(int)
            inside = obj.mask(obj.x0 - 8, obj.y0 - 8, pix.shape[1], pix.shape[0])
            core = inside.copy()
            for axis in (0, 1):  # erode by 6 pixels
                for s in range(1, 7):
                    core &= np.roll(inside, s, axis) & np.roll(inside, -s, axis)
            assert core.any()
            diff = np.abs(pix[core] - obj.color)
            assert np.median(diff) <= 3 and np.percentile(diff, 99) <= 12, np.percentile(diff, [50, 99, 100])
            # The exact box touches the object on all four sides.
            m = inside[8:-8, 8:-8] if pix.shape[0] > 16 else inside
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()


def test_ellipse_box_is_tight() -> None:
    obj = Planted(10, 20, 27, 31, shape="ellipse")
    (tight,) = exact_objects([obj], 100, 100, 3)
    full = tight.mask(0, 0, 100, 100)
    ys, xs = np.nonzero(full)
    assert tight.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    np.testing.assert_array_equal(full, obj.mask(0, 0, 100, 100))


def test_bad_plants_and_sizes_are_refused(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="no pixel"):
        make_slide(tmp_path / "x.tiff", 100, 100, source=sources[0], tile_size=64, plant=[(200, 200, 210, 210)])
    with pytest.raises(ConfigError, match="multiple of 16"):
        make_slide(tmp_path / "x.tiff", 100, 100, source=sources[0], tile_size=100)
    with pytest.raises(ConfigError, match="larger than the source"):
        make_slide(tmp_path / "x.tiff", 100, 100, source=sources[0], tile_size=4096)
    with pytest.raises(ConfigError, match="nodata"):
        make_geotiff(tmp_path / "x.tif", 100, 100, source=sources[1], tile=64, plant=[Planted(0, 0, 5, 5, (0, 0, 0))])
    assert list(tmp_path.iterdir()) == []


def test_scatter_objects_do_not_overlap() -> None:
    objs = scatter_objects(50, 2000, 1000, size=(20, 60), seed=4)
    assert len(objs) == 50
    canvas = np.zeros((1000, 2000), dtype=int)
    for o in objs:
        canvas += o.mask(0, 0, 2000, 1000)
    assert canvas.max() == 1
    with pytest.raises(ConfigError, match="do not fit"):
        scatter_objects(10_000, 500, 500)


def test_geotiff_georeference_nodata_and_objects(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    path = tmp_path / "scene.tif"
    box = {"x0": 700, "y0": 500, "x1": 760, "y1": 530, "color": (255, 0, 255)}
    (obj,) = make_geotiff(
        path,
        W,
        H,
        source=sources[1],
        crs="EPSG:32618",
        pixel_size=(10.0, 12.5),
        origin=(400_000.0, 4_500_000.0),
        tile=T,
        nodata=0,
        collar=40,
        plant=[box],
    )
    assert not path.with_name(path.name + ".partial").exists()
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32618
        assert tuple(ds.transform)[:6] == (10.0, 0.0, 400_000.0, 0.0, -12.5, 4_500_000.0)
        assert ds.nodata == 0
        assert ds.block_shapes[0] == (T, T)
        assert ds.compression.name.lower() == "deflate"
        assert ds.overviews(1) == [2, 4, 8]
    with densevision.open_image(path) as src:
        assert src.backend == "rasterio"
        assert src.crs.to_epsg() == 32618
        assert tuple(src.transform)[:6] == (10.0, 0.0, 400_000.0, 0.0, -12.5, 4_500_000.0)
        assert src.nodata == 0
        region = src.read_region((0, 0), 0, (W, H))
        inner = np.zeros((H, W), dtype=bool)
        inner[40:-40, 40:-40] = True
        np.testing.assert_array_equal(region.valid, inner)  # the collar only: nothing valid reads as nodata
        assert (region.pixels[~inner] == 0).all()
        patch = region.pixels[obj.y0 : obj.y1, obj.x0 : obj.x1]
        assert obj.box == (700, 500, 760, 530) and (patch == (255, 0, 255)).all()  # deflate: exact


def test_geotiff_without_nodata(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    path = tmp_path / "plain.tif"
    make_geotiff(path, 300, 200, source=sources[1], tile=64, nodata=None, crs="EPSG:3857", overviews=False)
    with densevision.open_image(path) as src:
        assert src.nodata is None and src.crs.to_epsg() == 3857 and src.level_count == 1
        assert src.read_region((0, 0), 0, (300, 200)).valid.all()


def test_generation_memory_is_bounded_by_a_row_of_tiles(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    """The peak of Python allocations grows with the width (one row of tiles), not with the image's area."""

    def peak(width: int, height: int) -> int:
        tracemalloc.start()
        try:
            make_slide(tmp_path / f"{width}x{height}.tiff", width, height, source=sources[0], tile_size=T)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, big = peak(1024, 512), peak(1024, 8192)  # 16 x taller: 24 MB of raw pixels more
    raw_big = 1024 * 8192 * 3
    assert big - small < raw_big / 16, (small, big)


TRIANGLE = Planted(0, 0, 1, 1, shape="polygon", label="triangle", polygon=(30.5, 7.0, 51.0, 40.0, 10.0, 40.0))


@pytest.mark.parametrize("obj", [TRIANGLE, Planted(10, 20, 27, 31, shape="ellipse", ellipse=(20.3, 25.1, 9.7, 5.2))])
def test_a_window_sees_the_pixels_of_the_whole_image(obj: Planted) -> None:
    full = obj.mask(0, 0, 64, 48)
    for x, y, w, h in [(0, 0, 64, 48), (13, 9, 20, 17), (40, 30, 30, 30), (-5, -3, 20, 20), (100, 100, 8, 8)]:
        window = np.zeros((h, w), dtype=bool)
        xs, ys = slice(max(x, 0), min(x + w, 64)), slice(max(y, 0), min(y + h, 48))
        if xs.start < xs.stop and ys.start < ys.stop:
            window[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = full[ys, xs]
        np.testing.assert_array_equal(obj.mask(x, y, w, h), window, err_msg=str((x, y, w, h)))


def test_a_polygon_is_what_cocos_rasteriser_fills() -> None:
    from pycocotools import mask as mask_utils

    (tight,) = exact_objects([TRIANGLE], 64, 48, 3)
    rle = mask_utils.frPyObjects([list(TRIANGLE.polygon or ())], 48, 64)
    expected = mask_utils.decode(mask_utils.merge(rle)).astype(bool)  # the reference: COCO's own decoding
    np.testing.assert_array_equal(tight.mask(0, 0, 64, 48), expected)
    ys, xs = np.nonzero(expected)
    assert tight.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) and tight.area == expected.sum()


def test_a_crowd_covers_its_parts_and_round_trips_through_json() -> None:
    parts = (Planted(2, 2, 8, 8, shape="ellipse"), Planted(20, 4, 26, 10, shape="ellipse"))
    crowd = Planted(0, 0, 32, 16, shape="ellipse", label="disc", parts=parts, iscrowd=True, file_name="a.jpg")
    (tight,) = exact_objects([crowd], 32, 16, 3)
    m = tight.mask(0, 0, 32, 16)
    np.testing.assert_array_equal(m, parts[0].mask(0, 0, 32, 16) | parts[1].mask(0, 0, 32, 16))
    assert tight.box == (2, 2, 26, 10) and tight.iscrowd
    assert Planted.from_dict(tight.as_dict()) == tight
    plain = Planted(1, 2, 3, 4, shape="ellipse", label="x")
    assert set(plain.as_dict()) == {"x0", "y0", "x1", "y1", "color", "shape", "label", "ellipse"}  # as before
