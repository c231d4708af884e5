"""Polygons of segmented regions, traced block by block, against rasterio.features.shapes over the whole class map
(pieces of one region united): the same regions, areas and outlines, valid geometry, and the files users open."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from PIL import Image
from rasterio import features
from scipy import ndimage

from densevision import segment_image
from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.measure import Units, measure
from densevision.stitch.polygons import RegionTracer, trace_regions

NODATA = 255


def class_map(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Classes 0..3 with every awkward case: smooth blobs across many blocks (with holes), a square ring around a
    block corner, one-pixel regions, a checkerboard (pixels touching only diagonally), classes along every image
    edge, and nodata."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((h, w)), 4)
    lo, hi = np.quantile(noise, [0.35, 0.65])
    c = np.digitize(noise, [lo, (lo + hi) / 2, hi]).astype(np.uint8)  # 0..3
    c[rng.random((h, w)) < 0.01] = 3  # specks: mostly one-pixel regions
    c[20:60, 40:80] = 1
    c[30:50, 50:70] = 2  # a hole in the ring, around the block corner (40, 64) below
    c[34:46, 56:64] = 1  # an island in the hole
    yy, xx = np.mgrid[70:90, 90:110]
    c[70:90, 90:110] = np.where((yy + xx) % 2 == 0, 2, 3)  # checkerboard: diagonal-only contacts
    c[:, 0], c[-1, :], c[0, 5:30], c[10:40, -1] = 1, 2, 3, 1  # along the edges
    c[rng.random((h, w)) < 0.002] = NODATA
    c[100:104, 0:20] = NODATA
    return c


ROWS, COLS = [0, 1, 17, 40, 41, 64, 100, 101, 150, 157], [0, 64, 65, 100, 130, 131, 160, 203]


def reference(cmap: np.ndarray, classes: set[int], connectivity: int, transform: Affine | None = None):
    """Per class, the regions of rasterio.features.shapes over the whole map, made valid."""
    out: dict[int, list[shapely.Geometry]] = {c: [] for c in classes}
    kwargs = {"transform": transform} if transform is not None else {}
    for g, v in features.shapes(cmap, connectivity=connectivity, **kwargs):
        if int(v) in classes:
            s = shapely.geometry.shape(g)
            out[int(v)].append(s if s.is_valid else shapely.make_valid(s))
    return out


def assert_same_regions(ours: list[shapely.Geometry], theirs: list[shapely.Geometry]) -> None:
    """One to one: each of ours equals one of theirs (symmetric difference 0, areas to 1e-9 relative)."""
    assert len(ours) == len(theirs)
    tree = shapely.STRtree(theirs)
    matched = set()
    for g in ours:
        hits = [int(j) for j in tree.query(g.representative_point()) if int(j) not in matched]
        same = [j for j in hits if shapely.symmetric_difference(g, theirs[j]).area == 0]
        assert len(same) == 1, g.wkt[:200]
        matched.add(same[0])
        assert g.area == pytest.approx(theirs[same[0]].area, rel=1e-9)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_blocks_give_the_regions_of_the_whole_class_map(connectivity):
    cmap = class_map(157, 203)
    classes = {1, 2, 3}
    regions = trace_regions(cmap, classes, rows=ROWS, cols=COLS, connectivity=connectivity)
    whole = reference(cmap, classes, connectivity)
    assert all(shapely.is_valid([r.geometry for r in regions]))
    for c in classes:
        ours = [r.geometry for r in regions if r.label == c]
        assert_same_regions(ours, whole[c])
        assert shapely.symmetric_difference(shapely.union_all(ours), shapely.union_all(whole[c])).area == 0
    # Vertices are those of the reference: borders of the blocks leave no extra points.
    ours_xy = {tuple(p) for r in regions for p in shapely.get_coordinates(r.geometry)}
    theirs_xy = {tuple(p) for c in classes for g in whole[c] for p in shapely.get_coordinates(g)}
    assert ours_xy == theirs_xy
    # The awkward cases are there: a region with a hole, one-pixel regions, and (8) diagonal-only joins.
    assert any(isinstance(r.geometry, shapely.Polygon) and r.geometry.interiors for r in regions)
    assert sum(r.geometry.area == 1 for r in regions) > 20
    if connectivity == 8:
        assert any(isinstance(r.geometry, shapely.MultiPolygon) for r in regions)


@pytest.mark.parametrize("seed", range(12))
def test_random_maps_and_random_blocks_give_the_whole_maps_regions(seed):
    """Pixel noise (every pixel a region boundary, diagonal contacts everywhere) cut at random block edges."""
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(5, 60, size=2))
    cmap = rng.integers(0, 3, (h, w)).astype(np.uint8)
    cmap[rng.random((h, w)) < 0.05] = NODATA
    rows = sorted({0, h, *rng.integers(1, h, size=int(rng.integers(0, 5))).tolist()})
    cols = sorted({0, w, *rng.integers(1, w, size=int(rng.integers(0, 5))).tolist()})
    connectivity = (4, 8)[seed % 2]
    regions = trace_regions(cmap, {1, 2}, rows=rows, cols=cols, connectivity=connectivity)
    whole = reference(cmap, {1, 2}, connectivity)
    assert all(shapely.is_valid([r.geometry for r in regions]))
    for c in (1, 2):
        assert_same_regions([r.geometry for r in regions if r.label == c], whole[c])


def test_checkerboard_pixels_are_separate_under_4_and_one_region_under_8():
    board = (np.indices((6, 7)).sum(0) % 2).astype(np.uint8)
    four = trace_regions(board, {1}, rows=[0, 3, 6], cols=[0, 2, 7], connectivity=4)
    eight = trace_regions(board, {1}, rows=[0, 3, 6], cols=[0, 2, 7], connectivity=8)
    assert len(four) == (board == 1).sum() == 21 and {r.geometry.area for r in four} == {1.0}
    assert len(eight) == 1 and eight[0].geometry.area == 21 and eight[0].geometry.is_valid


def test_one_block_and_many_blocks_give_the_same_regions():
    cmap = class_map(157, 203, seed=3)
    one = trace_regions(cmap, {1, 2, 3})
    many = trace_regions(cmap, {1, 2, 3}, rows=ROWS, cols=COLS)
    for c in (1, 2, 3):
        assert_same_regions([r.geometry for r in many if r.label == c], [r.geometry for r in one if r.label == c])


def test_a_region_cut_by_a_block_border_is_one_polygon_negative_control():
    """The pieces alone (no merge) would be two polygons: the merge is what makes them one."""
    cmap = np.zeros((4, 8), np.uint8)
    cmap[1:3, 1:7] = 1
    assert len(trace_regions(cmap, {1}, cols=[0, 4, 8])) == 1
    pieces = [shapely.geometry.shape(g) for half in (cmap[:, :4], cmap[:, 4:]) for g, v in features.shapes(half) if v]
    assert len(pieces) == 2


def test_finished_regions_are_let_go_block_row_by_block_row():
    """Small regions across a tall map: the tracer holds only those reaching the current block row's bottom."""
    cmap = np.zeros((400, 64), np.uint8)
    cmap[2::8, 2::8] = 1  # 50 x 8 one-pixel regions
    cmap[5:13, 30:34] = 2  # crosses the block row border at 8
    batches: list[int] = []
    tracer = RegionTracer(64, 400, {1, 2}, lambda regions: batches.append(len(regions)))
    for y0 in range(0, 400, 8):
        for x0 in (0, 32):
            tracer.add(y0, x0, cmap[y0 : y0 + 8, x0 : x0 + 32])
    tracer.finish()
    assert sum(batches) == 401 and tracer.max_open <= 1 and tracer.open == 0


def test_blocks_out_of_order_are_refused():
    tracer = RegionTracer(10, 10, {1}, lambda r: None)
    tracer.add(0, 0, np.zeros((5, 4), np.uint8))
    with pytest.raises(InvalidRegionError, match="row-major"):
        tracer.add(5, 0, np.zeros((5, 10), np.uint8))
    with pytest.raises(InvalidRegionError, match="rows high"):
        tracer.add(0, 4, np.zeros((4, 6), np.uint8))
    with pytest.raises(ConfigError, match="connectivity must be 4 or 8"):
        RegionTracer(10, 10, {1}, lambda r: None, connectivity=6)


def test_measurements_in_physical_units():
    square, ell = shapely.box(0, 0, 10, 10), shapely.Polygon([(0, 0), (4, 0), (4, 1), (1, 1), (1, 4), (0, 4)])
    m = measure([square, ell, shapely.box(0, 0, 2, 8)], Units((0.5, 0, 0, 0.5), "um"))
    np.testing.assert_allclose(m["area_um2"], [25, 1.75, 4])
    np.testing.assert_allclose(m["perimeter_um"], [20, 8, 10])
    np.testing.assert_allclose(m["solidity"], [1, 7 / 11.5, 1])  # the L's hull: 4 x 4 less a triangle of 4.5
    np.testing.assert_allclose(m["circularity"], [np.pi / 4, 4 * np.pi * 1.75 / 64, 4 * np.pi * 4 / 100])
    np.testing.assert_allclose(m["elongation"], [1, 1, 4])
    # A rotated raster transform (metres): the same shape measured the same.
    r = Affine.rotation(30) @ Affine.scale(10, -10)
    np.testing.assert_allclose(measure([square], Units((r.a, r.b, r.d, r.e), "m"))["area_m2"], [10000])


# --- end to end ----------------------------------------------------------------------------------------------------


class PatternPredictor(torch.nn.Module):
    """Per pixel, the class written into band 1 as ``50 * class + 25``: the class map is the input's pattern."""

    num_classes = 4
    class_names = ("background", "tumour", "stroma", "necrosis")
    palette = ((0, 0, 0), (200, 0, 0), (0, 150, 0), (90, 60, 30))
    size_divisor = 16
    device = torch.device("cpu")

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(batch[:, 0] // 50, 0, 3).long()
        return torch.nn.functional.one_hot(c, 4).permute(0, 3, 1, 2).float()


def _pattern_pixels(cmap: np.ndarray) -> np.ndarray:
    classes = np.where(cmap == NODATA, 0, cmap)
    return np.repeat((classes * 50 + 25).astype(np.uint8)[None], 3, axis=0)


@pytest.fixture
def scene(tmp_path):
    cmap = class_map(157, 203)
    cmap[cmap == NODATA] = 0
    path = tmp_path / "scene.tif"
    transform = Affine.translation(399960, 5000040) @ Affine.scale(10, -10)
    profile = dict(driver="GTiff", width=203, height=157, count=3, dtype="uint8", crs="EPSG:32631")
    with rasterio.open(path, "w", transform=transform, **profile) as dst:
        dst.write(_pattern_pixels(cmap))
    return path, cmap, transform


RUN = dict(tile=64, overlap=16, batch_size=2, workers=0, skip_empty=False, progress=False)


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".geojson"])
def test_raster_polygons_are_the_reference_mapped_through_the_transform(scene, tmp_path, suffix):
    path, cmap, transform = scene
    out = tmp_path / f"regions{suffix}"
    summary = segment_image(path, out=tmp_path / "seg.tif", predictor=PatternPredictor(), polygons=out,
                            native_crs=True, **RUN)  # fmt: skip
    with rasterio.open(tmp_path / "seg.tif") as seg:
        np.testing.assert_array_equal(seg.read(1), cmap)  # the pattern predictor is exact
    whole = reference(cmap, {1, 2, 3}, 4, transform)
    if suffix == ".geojson":
        doc = json.loads(out.read_text())
        assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32631"
        feats = doc["features"]
        geoms = [shapely.geometry.shape(f["geometry"]) for f in feats]
        props = [f["properties"] for f in feats]
    else:
        info = pyogrio.read_info(out)
        assert info["crs"] == "EPSG:32631" and info["geometry_type"] == "MultiPolygon"
        _, _, wkb, fields = pyogrio.raw.read(out)
        geoms = list(shapely.from_wkb(wkb))
        props = [dict(zip(info["fields"], values, strict=True)) for values in zip(*fields, strict=True)]
    assert all(shapely.is_valid(geoms))
    for c, name in ((1, "tumour"), (2, "stroma"), (3, "necrosis")):
        ours = [g for g, p in zip(geoms, props, strict=True) if p["class"] == name]
        assert_same_regions([shapely.get_parts(g)[0] if len(shapely.get_parts(g)) == 1 else g for g in ours], whole[c])
        ours_xy = {tuple(p) for g in ours for p in shapely.get_coordinates(g)}
        assert ours_xy == {tuple(p) for g in whole[c] for p in shapely.get_coordinates(g)}  # exactly, in metres
    assert "background" not in {p["class"] for p in props}
    # Measurements in metres (10 m pixels), summed per class in the summary.
    for g, p in zip(geoms, props, strict=True):
        assert p["area_m2"] == pytest.approx(g.area, rel=1e-9) and p["perimeter_m"] == pytest.approx(g.length)
        assert 0 < p["solidity"] <= 1 and 0 < p["circularity"] <= 1 and p["elongation"] >= 1
    classes = {c["name"]: c for c in summary["regions"]["classes"]}
    assert classes["stroma"]["regions"] == len(whole[2])
    assert classes["stroma"]["area_m2"] == pytest.approx(sum(g.area for g in whole[2]))
    assert summary["polygons"] == str(out) and summary["regions"]["coordinates"] == "EPSG:32631"


def test_raster_geojson_is_rfc7946_wgs84_counter_clockwise(scene, tmp_path):
    path, _, transform = scene
    out = tmp_path / "regions.geojson"
    segment_image(path, out=tmp_path / "seg.tif", predictor=PatternPredictor(), polygons=out, **RUN)
    doc = json.loads(out.read_text())
    assert "crs" not in doc
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds("EPSG:32631", "EPSG:4326", *rasterio.transform.array_bounds(
        157, 203, transform)[::1])  # fmt: skip
    for f in doc["features"]:
        g = shapely.geometry.shape(f["geometry"])
        assert g.is_valid
        for poly in shapely.get_parts(g):
            assert poly.exterior.is_ccw and all(not r.is_ccw for r in poly.interiors)
        x0, y0, x1, y1 = g.bounds
        assert west - 1e-9 <= x0 and x1 <= east + 1e-9 and south - 1e-9 <= y0 and y1 <= north + 1e-9


def test_min_area_simplify_and_excluded_classes(scene, tmp_path):
    path, cmap, _ = scene
    out = tmp_path / "regions.gpkg"
    summary = segment_image(
        path, out=tmp_path / "seg.tif", predictor=PatternPredictor(), polygons=out, min_area="5px", simplify=1.0,
        exclude_classes=["background", "necrosis"], **RUN,
    )  # fmt: skip
    whole = reference(cmap, {1, 2}, 4)
    _, _, wkb, fields = pyogrio.raw.read(out)
    classes = set(fields[0])
    assert classes == {"tumour", "stroma"}
    big = sum(g.area >= 5 for c in (1, 2) for g in whole[c])
    assert len(wkb) == big and summary["regions"]["dropped_below_min_area"] == sum(len(whole[c]) for c in (1, 2)) - big
    geoms = shapely.from_wkb(wkb)
    assert all(shapely.is_valid(geoms))
    exact = sum(g.area for c in (1, 2) for g in whole[c] if g.area >= 5) * 100
    assert shapely.area(geoms).sum() == pytest.approx(exact, rel=0.1)  # simplified: close, not equal
    assert shapely.get_num_coordinates(geoms).sum() < sum(len(shapely.get_coordinates(g)) for c in (1, 2)
                                                          for g in whole[c] if g.area >= 5)  # fmt: skip
    # In m2 (10 m pixels): 500 m2 is 5 pixels.
    again = segment_image(path, out=tmp_path / "seg2.tif", predictor=PatternPredictor(), polygons=tmp_path / "b.gpkg",
                          min_area=500, exclude_classes=["background", "necrosis"], **RUN)  # fmt: skip
    assert again["regions"]["regions"] == big


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"polygons": "r.shp"}, r"\.geojson.*\.gpkg.*\.fgb"),
        ({"polygons": "r.gpkg", "exclude_classes": ["tumor"]}, "cannot leave out class.*'tumor'.*tumour"),
        ({"polygons": "r.gpkg", "min_area": "5 acres"}, "minimum area"),
        ({"polygons": "r.gpkg", "min_area": "5um2"}, "measured in m2"),
        ({"polygons": "r.gpkg", "connectivity": 6}, "connectivity must be 4 or 8"),
        ({"polygons": "r.gpkg", "simplify": -1}, "simplify"),
    ],
)
def test_bad_polygon_settings_are_refused_before_any_tile(scene, tmp_path, options, says):
    path, _, _ = scene
    options = {k: tmp_path / v if k == "polygons" else v for k, v in options.items()}

    class Never(PatternPredictor):
        def forward(self, batch):
            raise AssertionError("predicted before the settings were checked")

    with pytest.raises(ConfigError, match=says):
        segment_image(path, out=tmp_path / "seg.tif", predictor=Never(), **options, **RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_slide_polygons_are_qupath_annotations_in_level0_pixels(tmp_path):
    """A plain image (no CRS, no resolution): QuPath annotation features, measurements in pixels; working at half
    resolution (mpp would need a slide: see the slow test), coordinates are level-0 pixels."""
    cmap = class_map(157, 203)
    cmap[cmap == NODATA] = 0
    image = tmp_path / "tissue.png"
    Image.fromarray(np.moveaxis(_pattern_pixels(cmap), 0, -1)).save(image)
    out = tmp_path / "regions.geojson"
    summary = segment_image(image, out=tmp_path / "seg.tif", predictor=PatternPredictor(), polygons=out,
                            connectivity=8, **RUN)  # fmt: skip
    doc = json.loads(out.read_text())
    assert "crs" not in doc
    whole = reference(cmap, {1, 2, 3}, 8)
    assert len(doc["features"]) == sum(len(v) for v in whole.values())
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["id"], str) and len(f["id"]) == 36
        p = f["properties"]
        assert p["objectType"] == "annotation"
        name = p["classification"]["name"]
        assert p["classification"]["color"] == list(PatternPredictor.palette[PatternPredictor.class_names.index(name)])
        g = shapely.geometry.shape(f["geometry"])
        assert g.is_valid
        m = p["measurements"]
        assert set(m) == {"Area px^2", "Perimeter px", "Solidity", "Circularity", "Elongation"}
        assert m["Area px^2"] == pytest.approx(g.area)
    assert summary["regions"]["coordinates"] == "level-0 pixels (QuPath)"


def test_polygons_survive_an_interrupted_run_and_resume_to_the_same_bytes(scene, tmp_path):
    path, _, _ = scene
    calls = []

    class Dies(PatternPredictor):
        def forward(self, batch):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("killed")
            return super().forward(batch)

    whole = tmp_path / "one" / "regions.geojson"
    segment_image(path, out=tmp_path / "one" / "seg.tif", predictor=PatternPredictor(), polygons=whole, **RUN)
    out = tmp_path / "two" / "regions.geojson"
    with pytest.raises(RuntimeError, match="killed"):
        segment_image(path, out=tmp_path / "two" / "seg.tif", predictor=Dies(), polygons=out, **RUN)
    assert not out.exists() and (tmp_path / "two" / "seg.tif.partial.d").is_dir()
    summary = segment_image(path, out=tmp_path / "two" / "seg.tif", predictor=PatternPredictor(), polygons=out,
                            resume=True, **RUN)  # fmt: skip
    assert summary["resumed"]["rows_already_done"] > 0
    assert out.read_bytes() == whole.read_bytes()


def test_two_passes_when_probabilities_are_written_in_strips_narrower_than_the_class_map(scene, tmp_path, monkeypatch):
    path, _, _ = scene
    # A class map alone is written row by row over its whole width, the polygons along with it.
    monkeypatch.setattr("densevision.apis.segment.assembly_strip", lambda k, itemsize: 64)
    alone = segment_image(path, out=tmp_path / "c.tif", predictor=PatternPredictor(), polygons=tmp_path / "c.gpkg",
                          **RUN)  # fmt: skip
    assert alone["timings"]["seconds_polygons_reading"] == 0
    monkeypatch.undo()
    run = RUN | {"probability_output": True}
    one = segment_image(path, out=tmp_path / "a.tif", predictor=PatternPredictor(), polygons=tmp_path / "a.gpkg",
                        **run)  # fmt: skip
    monkeypatch.setattr("densevision.apis.segment.assembly_strip", lambda k, itemsize: 64)
    two = segment_image(path, out=tmp_path / "b.tif", predictor=PatternPredictor(), polygons=tmp_path / "b.gpkg",
                        **run)  # fmt: skip
    assert two["timings"]["seconds_polygons_reading"] > 0 and one["timings"]["seconds_polygons_reading"] == 0
    for name in ("a.tif", "a.probs.tif"):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("a", "b")).read_bytes(), name
    assert (tmp_path / "c.tif").read_bytes() == (tmp_path / "a.tif").read_bytes()
    a, b = pyogrio.raw.read(tmp_path / "a.gpkg"), pyogrio.raw.read(tmp_path / "b.gpkg")
    assert list(a[2]) == list(b[2]) and all((x == y).all() for x, y in zip(a[3], b[3], strict=True))


def test_the_segment_command_as_a_user_types_it(scene, tmp_path, capsys, monkeypatch):
    """``densevision segment ... --polygons regions.gpkg --min-area 500 --simplify 0.5 --connectivity 8``."""
    from densevision.cli import main

    path, cmap, _ = scene
    monkeypatch.setattr("densevision.apis.segment.SegmentationTask.predictor", lambda self, m, d: PatternPredictor())
    out = tmp_path / "regions.gpkg"
    argv = ["segment", str(path), "-c", "any", "-o", str(tmp_path / "seg.tif"), "--tile", "64", "--overlap", "16",
            "--workers", "0", "--keep-empty", "-q", "--polygons", str(out), "--min-area", "500m2", "--simplify", "0.5",
            "--connectivity", "8", "--exclude-classes", "background"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"polygons: {out} (" in said
    whole = reference(cmap, {1, 2, 3}, 8)
    assert pyogrio.read_info(out)["features"] == sum(g.area >= 5 for v in whole.values() for g in v)
    assert main([*argv[:-2], "--polygons", str(tmp_path / "r.shp")]) == 2
    assert "name the file with one of these suffixes" in capsys.readouterr().err


def test_detections_carry_measurements(tmp_path):
    """Boxes get area and perimeter; the summary sums them per class."""
    from densevision.apis.detect import _measured

    boxes = [shapely.box(0, 0, 4, 2), shapely.box(10, 10, 13, 13)]
    got = _measured(boxes, Units((0.25, 0, 0, 0.25), "um"), descriptors=False)
    assert got == [{"area_um2": 0.5, "perimeter_um": 3.0}, {"area_um2": 0.5625, "perimeter_um": 3.0}]


TORCHRUN = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    from test_polygons import PatternPredictor
    from densevision import segment_image
    segment_image(sys.argv[1], out=sys.argv[2] + "/seg.tif", predictor=PatternPredictor(), polygons=sys.argv[2] +
                  "/regions.geojson", tile=64, overlap=16, workers=0, skip_empty=False, progress=False,
                  device="cpu")
    """
)


@pytest.mark.slow
def test_polygons_under_torchrun_equal_one_process(scene, tmp_path):
    from pathlib import Path

    path, _, _ = scene
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN)
    here = str(Path(__file__).parent)
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2"])):  # fmt: skip
        (tmp_path / name).mkdir()
        proc = subprocess.run([*launcher, str(script), str(path), str(tmp_path / name), here], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
    one, two = (tmp_path / n / "regions.geojson" for n in ("one", "two"))
    assert two.read_bytes() == one.read_bytes()


class Saturation(torch.nn.Module):
    """Glass / stained from saturation, per pixel."""

    num_classes, class_names = 2, ("glass", "stained")
    palette, size_divisor, device = ((220, 220, 220), (180, 0, 180)), 16, torch.device("cpu")

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        hi, lo = batch.max(dim=1).values, batch.min(dim=1).values
        sat = (hi - lo) / hi.clamp(min=1)
        return torch.stack([0.15 - sat, sat - 0.15], dim=1)


def test_slide_at_a_lower_level_gives_level0_coordinates_and_microns(tmp_path):
    """A generated slide (mpp 0.5) segmented at level 1 (downsample 2): the features are the class map's regions
    scaled to level-0 pixels, measured in um2 / um at 1 um per class-map pixel."""
    from densevision import open_image
    from densevision.synthetic.slides import make_slide

    slide = tmp_path / "slide.tiff"
    make_slide(slide, 640, 512, tile_size=128, mpp=0.5, seed=4)
    out = tmp_path / "regions.geojson"
    summary = segment_image(slide, out=tmp_path / "seg.tif", predictor=Saturation(), polygons=out, level=1,
                            exclude_classes=["glass"], **RUN)  # fmt: skip
    assert summary["settings"]["downsample"] == 2
    with open_image(tmp_path / "seg.tif") as seg:
        cmap = np.ascontiguousarray(seg.read_region((0, 0), 0, seg.size).pixels[..., 0])
    whole = reference(cmap, {1}, 4, Affine.scale(2))
    feats = json.loads(out.read_text())["features"]
    geoms = [shapely.geometry.shape(f["geometry"]) for f in feats]
    assert len(whole[1]) > 3
    assert_same_regions(geoms, whole[1])
    for f, g in zip(feats, geoms, strict=True):
        m = f["properties"]["measurements"]
        assert m["Area µm^2"] == pytest.approx(g.area * 0.25, rel=1e-9)  # level-0 px are 0.5 um
        assert m["Perimeter µm"] == pytest.approx(g.length * 0.5, rel=1e-9)
        assert f["properties"]["classification"] == {"name": "stained", "color": [180, 0, 180]}
    stained = summary["regions"]["classes"][0]
    assert stained["name"] == "stained" and stained["area_um2"] == pytest.approx(sum(g.area for g in geoms) * 0.25)


def _qgis_present() -> bool:
    try:
        return subprocess.run(["/usr/bin/python3", "-c", "import qgis.core"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not _qgis_present(), reason="QGIS is not importable by /usr/bin/python3 (apt-get install python3-qgis)"
)
def test_outputs_open_in_qgis_with_their_crs_and_extent(scene, tmp_path):
    import os
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from polygons import QGIS  # the benchmark's QGIS script: one copy

    path, _, _ = scene
    outs = {s: tmp_path / f"regions{s}" for s in (".gpkg", ".fgb", ".geojson")}
    for suffix, out in outs.items():
        segment_image(path, out=tmp_path / f"seg{suffix}.tif", predictor=PatternPredictor(), polygons=out, **RUN)
    proc = subprocess.run(["/usr/bin/python3", "-c", QGIS, *map(str, outs.values())], capture_output=True, text=True,
                          env=dict(os.environ, QT_QPA_PLATFORM="offscreen"), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for suffix, out in outs.items():
        q = found[str(out)]
        if suffix == ".geojson":
            geoms = [shapely.geometry.shape(f["geometry"]) for f in json.loads(out.read_text())["features"]]
            crs = "EPSG:4326"
        else:
            geoms, crs = list(shapely.from_wkb(pyogrio.raw.read(out)[2])), "EPSG:32631"
        assert q["valid"] and q["crs"] == crs and q["count"] == len(geoms)
        np.testing.assert_allclose(q["extent"], shapely.total_bounds(geoms), rtol=1e-12, atol=1e-9)
    assert "may only be partially supported" not in proc.stderr  # GeoPackage 1.2, which QGIS 3.22's GDAL reads


@pytest.mark.parametrize("masks", [False, True])
def test_detections_and_instance_masks_are_measured_in_metres(tmp_path, masks):
    """Each object's area and perimeter are its written outline's in the raster's CRS (metres); masks also get the
    shape descriptors; the summary sums them per class."""
    from densevision import detect_objects
    from densevision.synthetic.detectors import ColourDetector
    from densevision.synthetic.planted import Planted
    from densevision.synthetic.rasters import make_geotiff

    colours = {"magenta": (255, 0, 255), "cyan": (0, 255, 255)}
    plant = [Planted(40 + 90 * i, 60 + 40 * (i % 2), 70 + 90 * i, 100 + 40 * (i % 2), color=colours[name],
                     shape="ellipse" if i % 2 else "rect", label=name)
             for i, name in enumerate(["magenta", "cyan", "magenta", "cyan"])]  # fmt: skip
    path = tmp_path / "scene.tif"
    make_geotiff(path, 420, 260, plant=plant, pixel_size=2.0, seed=1, overviews=False)
    out = tmp_path / "objects.geojson"
    summary = detect_objects(path, out=out, predictor=ColourDetector(colours, masks=masks), tile=128, overlap=64,
                             workers=0, progress=False, native_crs=True, masks=masks)  # fmt: skip
    feats = json.loads(out.read_text())["features"]
    assert len(feats) == len(plant)
    for f in feats:
        g, p = shapely.geometry.shape(f["geometry"]), f["properties"]
        assert p["area_m2"] == pytest.approx(g.area, rel=1e-9) and p["perimeter_m"] == pytest.approx(g.length)
        assert ("solidity" in p) == ("circularity" in p) == ("elongation" in p) == masks
    for c in summary["classes"]:
        mine = [f for f in feats if f["properties"]["class"] == c["name"]]
        assert c["area_m2"] == pytest.approx(sum(f["properties"]["area_m2"] for f in mine))
