"""The finishing step in a process beside the prediction: the same bytes as finishing after it, its errors typed in
the caller, and nothing left that looks finished when either side stops."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from densevision import detect_objects, segment_image
from densevision.engine import finishing
from densevision.engine.finishing import Follow, Stopped, can_finish_alongside
from densevision.errors import DiskFullError, OutputError
from densevision.synthetic.detectors import ColourDetector
from densevision.synthetic.planted import scatter_objects
from densevision.synthetic.rasters import make_geotiff

pytestmark = pytest.mark.skipif(not can_finish_alongside(), reason="finishing alongside needs fork (Linux)")

COLOURS = {"magenta": (255, 0, 255), "cyan": (0, 255, 255)}


class _Conv(torch.nn.Module):
    """A small fixed convolution, 3 classes."""

    num_classes, class_names = 3, ("a", "b", "c")
    palette, size_divisor, device = ((255, 0, 0), (0, 255, 0), (0, 0, 255)), 16, torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 3, 5, padding=2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255.0)


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("finishing") / "scene.tif"
    profile = dict(driver="GTiff", width=333, height=250, count=3, dtype="uint8", crs="EPSG:32631")
    with rasterio.open(path, "w", transform=Affine.translation(0, 2500) @ Affine.scale(10, -10), **profile) as dst:
        dst.write(rng.integers(0, 256, (3, 250, 333), dtype=np.uint8))
    return path


SEGMENT = dict(tile=64, overlap=16, batch_size=3, blend="gaussian", probability_output=True, workers=0, progress=False)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.endswith(".summary.json")}


def test_segmentation_finished_alongside_gives_the_bytes_of_finishing_after(raster, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    alongside = segment_image(
        raster, out=a / "seg.tif", predictor=_Conv(), polygons=a / "seg.polygons.geojson", **SEGMENT
    )
    assert alongside["timings"]["finished_alongside"] is True
    monkeypatch.setattr("densevision.apis.job.can_finish_alongside", lambda: False)
    after = segment_image(raster, out=b / "seg.tif", predictor=_Conv(), polygons=b / "seg.polygons.geojson", **SEGMENT)
    assert after["timings"]["finished_alongside"] is False
    assert sorted(_files(a)) == ["seg.polygons.geojson", "seg.preview.png", "seg.probs.tif", "seg.tif"]
    assert _files(a) == _files(b)
    assert alongside["classes"] == after["classes"] and alongside["nodata_pixels"] == after["nodata_pixels"]
    assert {**alongside["regions"], "path": None} == {**after["regions"], "path": None}


def test_detection_finished_alongside_gives_the_bytes_of_finishing_after(tmp_path, monkeypatch):
    path = tmp_path / "objects.tif"
    objects = scatter_objects(30, 700, 500, colors=list(COLOURS.values()), size=(16, 60), seed=5)
    make_geotiff(path, 700, 500, plant=objects, seed=5)
    kw = dict(tile=128, overlap=32, workers=0, progress=False, skip_empty=False)
    alongside = detect_objects(
        path, out=tmp_path / "a" / "o.geojson", coco_out=tmp_path / "a" / "o.coco.json",
        predictor=ColourDetector(COLOURS), **kw,
    )  # fmt: skip
    monkeypatch.setattr("densevision.apis.job.can_finish_alongside", lambda: False)
    after = detect_objects(
        path, out=tmp_path / "b" / "o.geojson", coco_out=tmp_path / "b" / "o.coco.json",
        predictor=ColourDetector(COLOURS), **kw,
    )  # fmt: skip
    assert (alongside["timings"]["finished_alongside"], after["timings"]["finished_alongside"]) == (True, False)
    assert alongside["detections"] == after["detections"] and alongside["detections"]["objects"] > 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_an_error_while_finishing_reaches_the_caller_typed_and_the_rows_stay(raster, tmp_path, monkeypatch):
    ref = tmp_path / "ref" / "seg.tif"
    segment_image(raster, out=ref, predictor=_Conv(), **SEGMENT)

    def full(*args, **kwargs):
        raise DiskFullError("no space left on device on /x (writing seg.preview.png): free space and run again")

    out = tmp_path / "run" / "seg.tif"
    with monkeypatch.context() as m:
        m.setattr("densevision.apis.segment.save_preview", full)  # the forked finisher inherits it
        with pytest.raises(DiskFullError, match="no space left on device on /x"):
            segment_image(raster, out=out, predictor=_Conv(), **SEGMENT)
    # Nothing that looks finished; every row committed, so the resume only writes the outputs.
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.tif.partial.d"]
    summary = segment_image(raster, out=out, predictor=_Conv(), resume=True, **SEGMENT)
    assert summary["resumed"]["rows_already_done"] == summary["resumed"]["rows"]
    assert _files(out.parent) == _files(ref.parent)


def test_a_failing_prediction_stops_the_finisher_and_leaves_only_the_work_folder(raster, tmp_path):
    class Failing(_Conv):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 6:
                raise RuntimeError("simulated crash")
            return super().forward(x)

    out = tmp_path / "seg.tif"
    with pytest.raises(RuntimeError, match="simulated crash"):
        segment_image(raster, out=out, predictor=Failing(), **SEGMENT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.tif.partial.d"]  # no writer's partial file either
    assert not multiprocessing.active_children()


def _follow(tmp_path):
    parent, child = multiprocessing.get_context("fork").Pipe()
    return parent, Follow(child, os.getppid())  # as in a finisher: its parent is the caller's


def test_follow_waits_for_rows_and_the_word_to_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(finishing, "POLL_SECONDS", 0.001)
    parent, follow = _follow(tmp_path)
    row = tmp_path / "blocks-000000.npz"
    row.write_bytes(b"x")
    follow.wait_for(row)  # there: at once
    parent.send("stop")
    with pytest.raises(Stopped):
        follow.wait_for(tmp_path / "blocks-000001.npz")

    parent, follow = _follow(tmp_path)
    parent.send("commit")
    follow.wait_for_commit()
    with pytest.raises(OutputError, match="a committed row is missing"):
        follow.wait_for(tmp_path / "blocks-000001.npz")


def test_work_folder_following_reads_rows_once_committed(tmp_path):
    from densevision.engine.workdir import BlockFolder

    work = BlockFolder(tmp_path / "w", {"a": 1}, resume=False, rows=[0, 2, 4], cols=[0, 3])
    parent, follow = _follow(tmp_path)
    view = work.following(follow)
    assert view.follow is follow and work.follow is None
    work.put(0, 0, np.zeros((2, 3), np.uint8))
    blocks = view.blocks()
    assert next(blocks)[:2] == (0, 0)
    parent.send("stop")  # row 1 never comes
    with pytest.raises(Stopped):
        next(blocks)
    assert json.loads((tmp_path / "w" / "run.json").read_text()) == {"a": 1, "work_layout": BlockFolder.layout}


GDAL_POOL_THEN_FORK = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from densevision import segment_image
    from densevision.io import GeoTiffWriter

    # GDAL's compression threads start in this process: a finisher forked from it must not hand them work.
    with GeoTiffWriter(sys.argv[2] + ".first.tif", 600, 600, 4, np.float32) as w:
        w.write(np.random.default_rng(0).random((600, 600, 4), dtype=np.float32), 0, 0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    net.num_classes, net.class_names, net.palette = 3, ("a", "b", "c"), ((1, 1, 1),) * 3
    net.size_divisor, net.device = 16, torch.device("cpu")
    s = segment_image(sys.argv[1], out=sys.argv[2], predictor=net, tile=64, overlap=16, probability_output=True,
                      workers=0, progress=False)
    print(s["timings"]["finished_alongside"])
    """
)


def test_a_finisher_forked_after_gdal_started_its_threads_finishes(raster, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(GDAL_POOL_THEN_FORK)
    done = subprocess.run(
        [sys.executable, str(script), str(raster), str(tmp_path / "seg.tif")], capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"]
    with rasterio.open(tmp_path / "seg.probs.tif") as ds:
        assert ds.count == 3 and np.isfinite(ds.read()).all()
