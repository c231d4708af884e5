"""detect_objects end to end: planted objects straddling tile borders and corners are found once, whole, in the
image's coordinates (CRS for rasters, QuPath level-0 pixels for slides); resume; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import shapely
from pycocotools import mask as mask_utils
from rasterio.features import rasterize
from rasterio.warp import transform as warp_transform

from densevision import detect_objects, segment_instances
from densevision.errors import ConfigError
from densevision.synthetic.detectors import ColourDetector, ColourSam
from densevision.synthetic.planted import Planted
from densevision.synthetic.rasters import make_geotiff
from densevision.synthetic.slides import make_slide
from densevision.tiling import TileGrid

TILE, OVERLAP = 256, 64
COLOURS = {"magenta": (255, 0, 255), "cyan": (0, 255, 255)}


def straddling_objects(width: int, height: int, seed: int = 0) -> list[Planted]:
    """Objects centred on tile corners, on tile borders and inside tiles of the detection grid, 20..44 px (less
    than the overlap, so some tile sees each whole, and apart), alternating rectangles and ellipses of two colours."""
    grid = TileGrid(width, height, TILE, OVERLAP)
    rng = np.random.default_rng(seed)
    centres = []
    for r, y in enumerate(grid.ys[1:], start=1):
        for c, x in enumerate(grid.xs[1:], start=1):
            kind = (r + c) % 3
            if kind == 0:
                centres.append((x, y))  # on a tile corner: cut by the starts of a tile row and column
            elif kind == 1:
                centres.append((x + 100, y + OVERLAP))  # across the bottom end of the tile row above
            else:
                centres.append((x + OVERLAP, y + 100))  # across the right end of the tile column to the left
    out = []
    for i, (cx, cy) in enumerate(centres):
        w, h = (int(v) for v in rng.integers(20, 45, size=2))
        x0, y0 = int(cx - w // 2), int(cy - h // 2)
        name = list(COLOURS)[i % 2]
        shape = "ellipse" if i % 3 == 0 else "rect"
        out.append(Planted(x0, y0, x0 + w, y0 + h, color=COLOURS[name], shape=shape, label=name))
    return out


@pytest.fixture(scope="module")
def scene(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("detect") / "scene.tif"
    planted = make_geotiff(path, 1400, 1000, plant=straddling_objects(1400, 1000), seed=3)
    return path, planted


def pixel_bounds(feature_coords: np.ndarray, transform) -> np.ndarray:
    cols, rows = ~transform @ (feature_coords[:, 0], feature_coords[:, 1])
    return np.array([np.min(cols), np.min(rows), np.max(cols), np.max(rows)])


def match_once(found: np.ndarray, planted: list[Planted], tol: float = 2.0) -> None:
    """Every planted box is matched by exactly one found box within ``tol`` pixels, and nothing else was found."""
    truth = np.array([p.box for p in planted], dtype=float)
    diff = np.abs(found[:, None, :] - truth[None, :, :]).max(axis=-1)  # found x planted
    close = diff <= tol
    assert (close.sum(axis=0) == 1).all(), f"planted objects found {close.sum(axis=0).tolist()} times"
    assert (close.sum(axis=1) == 1).all(), "a detection matches no planted object"
    assert len(found) == len(planted)


def test_planted_objects_found_once_in_crs(scene, tmp_path):
    path, planted = scene
    out = tmp_path / "objects.geojson"
    summary = detect_objects(
        path, out=out, predictor=ColourDetector(COLOURS), tile=TILE, overlap=OVERLAP, workers=0,
        native_crs=True, coco_out=tmp_path / "coco.json", progress=False,
    )  # fmt: skip
    assert len(planted) > 20 and summary["model"]["masks"] is None
    fc = json.loads(out.read_text())
    assert fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32618"
    with rasterio.open(path) as ds:
        transform = ds.transform
    found = np.array([pixel_bounds(np.array(f["geometry"]["coordinates"][0]), transform) for f in fc["features"]])
    match_once(found, planted, tol=1e-6)  # the colour detector is exact, and so must the merge be
    labels = {p.label for p in planted}
    assert {f["properties"]["class"] for f in fc["features"]} == labels
    assert summary["detections"]["objects"] == len(planted)
    assert summary["detections"]["raw"] > len(planted)  # objects in overlaps were seen by several tiles
    counts = {c["name"]: c["count"] for c in summary["classes"]}
    assert counts == {n: sum(p.label == n for p in planted) for n in COLOURS}
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert len(coco) == len(planted)
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in coco)])
    match_once(boxes, planted, tol=1e-6)
    assert (tmp_path / "objects.preview.png").is_file()
    assert not list(tmp_path.glob("*.partial*"))


def test_wgs84_coordinates_are_the_crs_corners_reprojected(scene, tmp_path):
    path, planted = scene
    out = tmp_path / "wgs84.geojson"
    detect_objects(path, out=out, predictor=ColourDetector(COLOURS), tile=TILE, overlap=OVERLAP, workers=0,
                   progress=False)  # fmt: skip
    fc = json.loads(out.read_text())
    assert "crs" not in fc
    with rasterio.open(path) as ds:
        transform, crs = ds.transform, ds.crs
    p = planted[0]
    cols, rows = np.array([p.x0, p.x1, p.x1, p.x0]), np.array([p.y0, p.y0, p.y1, p.y1])
    xs, ys = transform @ (cols, rows)
    corners = np.array(warp_transform(crs, "EPSG:4326", list(xs), list(ys))).T
    vertices = np.concatenate([np.array(f["geometry"]["coordinates"][0]) for f in fc["features"]])
    for corner in corners:  # each corner of the box, reprojected, is a vertex of one feature
        assert np.abs(vertices - corner).max(axis=1).min() < 1e-9


@pytest.mark.parametrize("masks_from", ["detector", "sam"])
def test_instance_outlines_are_pixel_exact_across_tiles(scene, tmp_path, masks_from):
    """The detector's own masks (pieces of objects cut by tile borders united) or a box-prompted mask model
    (prompted once per merged object, in a window that holds it whole) give each planted object's exact outline."""
    path, planted = scene
    out = tmp_path / "instances.geojson"
    options = dict(tile=TILE, overlap=OVERLAP, workers=0, native_crs=True, coco_out=tmp_path / "coco.json")
    if masks_from == "detector":
        summary = segment_instances(path, out=out, predictor=ColourDetector(COLOURS, masks=True), **options)
    else:
        sam = ColourSam(COLOURS)
        summary = segment_instances(path, out=out, predictor=ColourDetector(COLOURS), sam_predictor=sam, **options)
        assert summary["timings"]["sam_windows"] == len(sam.windows) <= summary["tiles"]["total"]
        assert all(shape == (TILE, TILE) for shape in sam.windows)
    assert summary["model"]["masks"] == masks_from
    with rasterio.open(path) as ds:
        inverse = ~ds.transform
    shapes = [
        shapely.transform(shapely.geometry.shape(f["geometry"]), lambda xy: np.stack(inverse @ tuple(xy.T), axis=1))
        for f in json.loads(out.read_text())["features"]
    ]
    assert len(shapes) == len(planted)
    for p in planted:
        truth = p.mask(p.x0, p.y0, p.x1 - p.x0, p.y1 - p.y0)
        shape = min(shapes, key=lambda s: shapely.distance(s.centroid, shapely.box(*p.box).centroid))
        drawn = rasterize([shape], out_shape=truth.shape, transform=rasterio.Affine.translation(p.x0, p.y0)) > 0
        assert (drawn == truth).all(), p  # pixel-exact outline, also for objects cut by tile borders
    coco = json.loads((tmp_path / "coco.json").read_text())
    total = sum(int(mask_utils.area(r["segmentation"])) for r in coco)
    assert total == sum(p.area for p in planted)


def test_resume_after_a_crash_gives_the_same_file(scene, tmp_path):
    path, _ = scene
    options = dict(tile=TILE, overlap=OVERLAP, workers=0, batch_size=3, progress=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = detect_objects(path, out=tmp_path / "a" / "o.geojson", predictor=ColourDetector(COLOURS), **options)
    out = tmp_path / "b" / "o.geojson"
    with pytest.raises(RuntimeError, match="simulated crash"):
        detect_objects(path, out=out, predictor=ColourDetector(COLOURS, fail_after=7), **options)
    assert not out.exists()
    work = tmp_path / "b" / "o.geojson.partial.d"
    done = len(list(work.glob("row-*.npz")))
    assert 0 < done < whole["tiles"]["total"] // 6
    with pytest.raises(ConfigError, match="--resume"):
        detect_objects(path, out=out, predictor=ColourDetector(COLOURS), **options)
    resumed = detect_objects(path, out=out, predictor=ColourDetector(COLOURS), resume=True, **options)
    assert resumed["resumed"]["rows_already_done"] == done
    assert out.read_bytes() == (tmp_path / "a" / "o.geojson").read_bytes()
    assert not work.exists()


def test_a_row_that_cannot_be_written_stops_the_run_with_its_error(scene, tmp_path, monkeypatch):
    """Rows are written beside the model: a failed write (here the third row's) still stops the run with its own
    error, the rows before it committed, so that a resume starts after them and gives the uninterrupted file."""
    from densevision.engine.workdir import RecordFolder
    from densevision.errors import OutputError

    path, _ = scene
    options = dict(tile=TILE, overlap=OVERLAP, workers=0, batch_size=3, progress=False, masks=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    detect_objects(path, out=tmp_path / "a" / "o.geojson", predictor=ColourDetector(COLOURS, masks=True), **options)
    put = RecordFolder.put

    def failing_put(self, k, arrays):
        if k == 2:
            raise OutputError("simulated full disk")
        put(self, k, arrays)

    monkeypatch.setattr(RecordFolder, "put", failing_put)
    out = tmp_path / "b" / "o.geojson"
    with pytest.raises(OutputError, match="simulated full disk"):
        detect_objects(path, out=out, predictor=ColourDetector(COLOURS, masks=True), **options)
    assert sorted(p.name for p in (tmp_path / "b" / "o.geojson.partial.d").glob("*.npz")) == [
        "row-000000.npz", "row-000001.npz",
    ]  # fmt: skip
    monkeypatch.setattr(RecordFolder, "put", put)
    resumed = detect_objects(path, out=out, predictor=ColourDetector(COLOURS, masks=True), resume=True, **options)
    assert resumed["resumed"]["rows_already_done"] == 2
    assert out.read_bytes() == (tmp_path / "a" / "o.geojson").read_bytes()


def test_slide_gives_qupath_features_in_level0_pixels(data_dir, tmp_path):
    slide = tmp_path / "slide.tiff"
    planted = make_slide(slide, 1400, 1000, plant=straddling_objects(1400, 1000, seed=1), seed=2, quality=95)
    for level, tol in ((0, 2.0), (1, 4.0)):
        out = tmp_path / f"level{level}.geojson"
        summary = detect_objects(
            slide, out=out, predictor=ColourDetector(COLOURS, tolerance=60, min_pixels=20), tile=TILE // (1 + level),
            overlap=OVERLAP // (1 + level), level=level, workers=0, skip_empty=False, progress=False,
        )  # fmt: skip
        assert summary["coordinates"] == "level-0 pixels (QuPath)"
        features = json.loads(out.read_text())["features"]
        assert all(f["properties"]["objectType"] == "detection" for f in features)
        assert {f["properties"]["classification"]["name"] for f in features} == set(COLOURS)
        assert all(len(f["id"]) == 36 for f in features)  # QuPath wants UUIDs
        found = np.array([shapely.geometry.shape(f["geometry"]).bounds for f in features])
        match_once(found, planted, tol=tol)


def test_bad_input_fails_before_work(scene, tmp_path):
    path, _ = scene
    det = ColourDetector(COLOURS)
    with pytest.raises(ConfigError, match=r"\.geojson"):
        detect_objects(path, out=tmp_path / "o.tif", predictor=det)
    with pytest.raises(ConfigError, match="merge method"):
        detect_objects(path, out=tmp_path / "o.geojson", predictor=det, merge="wbf")
    with pytest.raises(ConfigError, match="no mask head"):
        segment_instances(path, out=tmp_path / "o.geojson", predictor=det)
    with pytest.raises(ConfigError, match="needs a model"):
        detect_objects(path, out=tmp_path / "o.geojson")
    assert det.calls == 0
    assert not list(tmp_path.iterdir())


def test_two_ranks_give_the_same_file(scene, tmp_path):
    """torchrun with two CPU processes (gloo): each rank predicts a share of the tile rows, rank 0 merges."""
    import subprocess
    import sys
    import textwrap

    path, _ = scene
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from densevision.synthetic.detectors import ColourDetector
            from densevision import detect_objects
            r = detect_objects(sys.argv[1], out=sys.argv[2], predictor=ColourDetector({COLOURS!r}, masks=True),
                               tile={TILE}, overlap={OVERLAP}, batch_size=3, workers=0, progress=False)
            print("tiles predicted:", r["timings"].get("tiles", 0))
            """
        )
    )
    outs = {}
    for name, launcher in (
        ("one", []),
        ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ):
        (tmp_path / name).mkdir()
        outs[name] = tmp_path / name / "o.geojson"
        proc = subprocess.run(
            [sys.executable, *launcher, str(script), str(path), str(outs[name])], capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
        shares = [int(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("tiles predicted:")]
        assert len(shares) == (2 if launcher else 1) and all(n > 0 for n in shares), proc.stdout
    assert outs["two"].read_bytes() == outs["one"].read_bytes()


def test_overview_pass_joins_an_object_larger_than_the_overlap(data_dir, tmp_path):
    """An object wider than the overlap is seen by no tile whole: tiles alone report pieces; the overview pass (the
    whole image shrunk to one tile) sees it whole and joins the pieces, while small objects keep their exact boxes."""
    size = (1400, 1000)
    small = straddling_objects(*size)
    big = Planted(300, 230, 700, 560, color=COLOURS["cyan"], shape="rect", label="cyan")
    small = [p for p in small if not shapely.intersects(shapely.box(*p.box).buffer(4), shapely.box(*big.box))]
    path = tmp_path / "big.tif"
    planted = make_geotiff(path, *size, plant=[*small, big], seed=3)
    options = dict(tile=TILE, overlap=OVERLAP, workers=0, native_crs=True, progress=False)
    with rasterio.open(path) as ds:
        transform = ds.transform

    def boxes(out):
        fc = json.loads(out.read_text())["features"]
        return np.array([pixel_bounds(np.array(f["geometry"]["coordinates"][0]), transform) for f in fc])

    # Exact colours on the tiles; the shrunk overview's edges are averaged, so the overview detector is lenient.
    detector = ColourDetector(COLOURS, tolerance=60)
    detect_objects(path, out=tmp_path / "tiles.geojson", predictor=detector, **options)
    alone = boxes(tmp_path / "tiles.geojson")
    assert not (np.abs(alone - big.box).max(axis=1) <= 2).any()  # no tile saw it whole
    summary = detect_objects(path, out=tmp_path / "both.geojson", predictor=detector, overview=True, **options)
    assert summary["detections"]["overview"] >= 1
    found = boxes(tmp_path / "both.geojson")
    downsample = max(size) / TILE  # of the overview
    match_once(found[np.abs(found - big.box).max(axis=1) > downsample + 1], planted[:-1], tol=1e-6)
    assert (np.abs(found - big.box).max(axis=1) <= downsample + 1).sum() == 1


class _BatchedColourSam(ColourSam):
    """ColourSam taking several windows per call, as SamBoxPredictor.predict_windows does."""

    def __init__(self, colours: dict[str, tuple[int, ...]]) -> None:
        super().__init__(colours)
        self.batches: list[int] = []

    def predict_windows(self, images, boxes):
        self.batches.append(len(images))
        return [self(image, b) for image, b in zip(images, boxes, strict=True)]


def test_sam_windows_are_read_by_the_reader_workers_and_prompted_in_batches(scene, tmp_path, monkeypatch):
    """Windows read in 2 worker processes and given to SAM 3 at a time: the same file as one window at a time read
    in this process."""
    import os

    from densevision.apis import detect

    path, _ = scene
    readers = tmp_path / "readers.txt"
    read = detect._SamWindows.__getitem__

    def recorded(self, i):
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return read(self, i)

    monkeypatch.setattr(detect._SamWindows, "__getitem__", recorded)
    options = dict(tile=TILE, overlap=OVERLAP, native_crs=True, predictor=ColourDetector(COLOURS))
    one = ColourSam(COLOURS)
    segment_instances(path, out=tmp_path / "one.geojson", sam_predictor=one, workers=0, batch_size=1, **options)
    assert set(readers.read_text().split()) == {str(os.getpid())}
    readers.unlink()
    batched = _BatchedColourSam(COLOURS)
    summary = segment_instances(
        path, out=tmp_path / "batched.geojson", sam_predictor=batched, workers=2, batch_size=3, **options
    )
    assert (tmp_path / "batched.geojson").read_bytes() == (tmp_path / "one.geojson").read_bytes()
    assert sum(batched.batches) == summary["timings"]["sam_windows"] == len(one.windows) > 3
    assert max(batched.batches) == 3
    pids = readers.read_text().split()
    assert len(pids) == len(one.windows) and str(os.getpid()) not in pids and len(set(pids)) == 2
