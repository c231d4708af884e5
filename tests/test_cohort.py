"""Cohorts as users run them: a folder or a manifest of generated slides and GeoTIFFs (with a corrupt and an
unsupported file among them) through ``densevision segment INPUT... -o OUT_DIR``: the model built once, every output
byte-identical to the single-image command's, failures recorded while the rest go on, a re-run that skips what is
done, a SIGKILL mid-cohort, --overwrite, --shard, claims held by other processes, manifests that try to write outside
OUT_DIR, and torchrun ranks that each take whole images, each image exactly once."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densevision.cli import main
from densevision.configs import find_config
from densevision.synthetic.rasters import make_geotiff
from densevision.synthetic.slides import make_slide

CLASSES = ("background", "tumour", "stroma")
TILING = ["--tile", "64", "--overlap", "16", "-q"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A model-only config and a checkpoint of its random weights (so that every build loads the same model)."""
    import torch
    from mmengine.config import Config

    from densevision.predictors.mmseg import MMSegPredictor

    root = tmp_path_factory.mktemp("model")
    cfg = Config.fromfile(find_config("demo/upernet_swin-tiny_demo-256")).model
    for head in ("decode_head", "auxiliary_head"):
        cfg[head]["num_classes"] = len(CLASSES)
    config = root / "seg.py"
    Config({"model": cfg.to_dict(), "metainfo": {"classes": CLASSES}}).dump(config)
    checkpoint = root / "seg.pth"
    weights = MMSegPredictor.from_config(config).model.state_dict()
    torch.save({"state_dict": weights, "meta": {"dataset_meta": {"classes": CLASSES}}}, checkpoint)
    return config, checkpoint


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """slides/a/case.tiff and slides/b/case.tiff (same name, different folders), a GeoTIFF, a PNG, a corrupt TIFF
    and a file that is no image at all."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides" / "a").mkdir(parents=True)
    (root / "slides" / "b").mkdir()
    make_slide(root / "slides" / "a" / "case.tiff", 320, 256, tile_size=128, seed=1)
    make_slide(root / "slides" / "b" / "case.tiff", 256, 192, tile_size=128, seed=2)
    make_geotiff(root / "scene.tif", 200, 170, tile=128, seed=3)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(root / "photo.png")
    good = (root / "scene.tif").read_bytes()
    (root / "corrupt.tif").write_bytes(good[: len(good) // 3])  # truncated inside its tiles
    (root / "notes.tiff").write_text("these are notes, not an image\n")
    return root


GOOD = ("slides/a/case", "slides/b/case", "scene", "photo")
BAD = ("corrupt", "notes")


def _args(model: tuple[Path, Path]) -> list[str]:
    return ["-c", str(model[0]), "-w", str(model[1]), *TILING]


@pytest.fixture(scope="module")
def singles(model, cohort, tmp_path_factory) -> dict[str, bytes]:
    """Each good image through the single-image command: the reference bytes."""
    out = tmp_path_factory.mktemp("singles")
    found = {}
    for name in GOOD:
        image = next(cohort.glob(name + ".*"))
        target = out / (name.replace("/", "_") + ".tif")
        assert main(["segment", str(image), "-o", str(target), *_args(model)]) == 0
        found[name] = target.read_bytes()
    return found


@pytest.fixture(scope="module")
def one_process(model, cohort, tmp_path_factory) -> dict[str, bytes]:
    """The cohort through one process with one thread, as each rank of a torchrun has (torchrun sets
    OMP_NUM_THREADS=1): the reference for the torchrun runs. The model's floats depend on the thread count in the last
    bits, which flips near-tie pixels (measured: one pixel of the scene with this checkpoint, 2 threads against 1)."""
    out = tmp_path_factory.mktemp("one-process")
    cmd = [sys.executable, "-m", "densevision.cli", "segment", str(cohort), "-o", str(out), *_args(model)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the two bad files
    return {name: (out / f"{name}.tif").read_bytes() for name in GOOD}


def _builds(monkeypatch) -> list[str]:
    """Count the model builds (every segmentation predictor is built through predictors.mmseg.build_model)."""
    import densevision.predictors.mmseg as mmseg

    calls: list[str] = []
    real = mmseg.build_model

    def counted(*a, **k):
        calls.append(str(a[0]))
        return real(*a, **k)

    monkeypatch.setattr(mmseg, "build_model", counted)
    return calls


def _report(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "cohort.csv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_a_folder_cohort_builds_once_equals_single_commands_and_records_failures(
    model, cohort, singles, tmp_path, monkeypatch, capsys
):
    builds = _builds(monkeypatch)
    out = tmp_path / "out"
    assert main(["segment", str(cohort), "-o", str(out), *_args(model)]) == 1  # two images failed
    assert len(builds) == 1
    for name, reference in singles.items():
        assert (out / f"{name}.tif").read_bytes() == reference, name
    rows = _report(out)
    assert sorted(rows) == sorted(GOOD + BAD)
    assert {n: rows[n]["status"] for n in rows} == {**dict.fromkeys(GOOD, "done"), **dict.fromkeys(BAD, "failed")}
    assert "corrupt.tif" in rows["corrupt"]["error"] and "notes.tiff" in rows["notes"]["error"]
    assert int(rows["scene"]["tiles_done"]) > 0 and float(rows["scene"]["seconds"]) > 0
    assert rows["scene"]["tumour area_m2"] != ""  # the GeoTIFF has a metric CRS: areas in m2
    for name in BAD:  # nothing that looks finished
        assert not (out / f"{name}.tif").exists() and not (out / f"{name}.summary.json").exists()
        assert json.loads((out / f"{name}.failed.json").read_text())["error"] == rows[name]["error"]
    report = json.loads((out / "cohort.json").read_text())
    assert report["counts"] == {"done": 4, "failed": 2, "changed": 0, "running": 0, "pending": 0}
    said = capsys.readouterr()
    assert "cohort: 4 of 6 done" in said.out and "Traceback" not in said.out + said.err
    assert not list(out.rglob("*.claim")) and not list(out.rglob("*.partial*"))

    # The same command again: the good images are skipped (only the failed ones are tried again).
    stamps = {n: (out / f"{n}.tif").stat().st_mtime_ns for n in GOOD}
    assert main(["segment", str(cohort), "-o", str(out), *_args(model)]) == 1
    assert {n: (out / f"{n}.tif").stat().st_mtime_ns for n in GOOD} == stamps
    assert "4 before" in capsys.readouterr().out


def test_a_manifest_with_per_image_settings_and_a_second_run_that_builds_nothing(
    model, cohort, singles, tmp_path, monkeypatch
):
    manifest = tmp_path / "lists" / "cohort.csv"
    manifest.parent.mkdir()
    rel = os.path.relpath(cohort, manifest.parent)
    manifest.write_text(
        "path,name,mpp,patient\n"
        f"{rel}/slides/a/case.tiff,case-a,,p1\n"
        f"{rel}/slides/b/case.tiff,,1.0,p2\n"  # its own resolution; named by its path below the manifest's folder
        f"{cohort}/photo.png,,,p3\n"
        f"{rel}/photo.png,,,p3\n"  # the same image again: done once
    )
    out = tmp_path / "out"
    builds = _builds(monkeypatch)
    assert main(["segment", str(manifest), "-o", str(out), *_args(model)]) == 0
    assert len(builds) == 1
    rows = _report(out)
    b = f"{cohort.name}/slides/b/case"  # '..' dropped: the names stay inside OUT_DIR
    assert sorted(rows) == sorted(["case-a", "photo", b])
    assert (out / "case-a.tif").read_bytes() == singles["slides/a/case"]
    summary = json.loads((out / f"{b}.summary.json").read_text())
    assert summary["settings"]["mpp"] == 1.0 and summary["output_size"] == [128, 96]  # 0.5 um/px slide, halved
    # Nothing left to do: no model is built and no output is touched.
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*.tif"))
    builds.clear()
    assert main(["segment", str(manifest), "-o", str(out), *_args(model)]) == 0
    assert builds == [] and sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*.tif")) == before


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ("{img},/etc/evil", "must be a relative path inside the output folder"),
        ("{img},../../evil", "must be a relative path inside the output folder"),
        ("{img},ok,1.0x", "mpp is a number"),
        ("{img},ok,1.0\n{img},other,2.0", "also given by"),
    ],
)
def test_a_manifest_cannot_write_outside_out_dir_and_bad_rows_are_usage_errors(
    model, cohort, tmp_path, capsys, row, says
):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,name,mpp\n" + row.format(img=cohort / "photo.png") + "\n")
    code = main(["segment", str(manifest), "-o", str(tmp_path / "out"), *_args(model)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil.tif").exists()
    assert not list((tmp_path / "out").rglob("*.tif")) if (tmp_path / "out").exists() else True


def test_fail_fast_stops_at_the_first_failure_in_one_line(model, cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(cohort), "-o", str(out), "--fail-fast", *_args(model)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("densevision: error:") and "corrupt.tif" in err[0]  # sorted first
    assert not list(out.rglob("*.tif")) and json.loads((out / "corrupt.failed.json").read_text())["error"]


def test_a_missing_image_in_a_manifest_is_recorded_and_the_rest_go_on(model, cohort, tmp_path):
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"# one path a line\nmissing.png\n{cohort / 'photo.png'}\n")
    assert main(["segment", str(manifest), "-o", str(tmp_path / "out"), *_args(model)]) == 1
    rows = _report(tmp_path / "out")
    assert rows["photo"]["status"] == "done" and rows["missing"]["status"] == "failed"
    assert "missing.png" in rows["missing"]["error"]


def test_changed_settings_are_reported_and_redone_only_with_overwrite(model, cohort, tmp_path, capsys):
    image = cohort / "photo.png"
    out = tmp_path / "out"
    assert main(["segment", str(image), "-o", str(out) + "/", *_args(model)]) == 0  # -o a folder: a cohort of one
    first = (out / "photo.tif").read_bytes()
    other = ["-c", str(model[0]), "-w", str(model[1]), "--tile", "96", "--overlap", "16", "-q"]
    assert main(["segment", str(image), "-o", str(out) + "/", *other]) == 1
    assert "1 with other settings" in capsys.readouterr().out
    assert (out / "photo.tif").read_bytes() == first  # left alone
    assert _report(out)["photo"]["status"] == "changed"
    assert main(["segment", str(image), "-o", str(out) + "/", *other, "--overwrite"]) == 0
    summary = json.loads((out / "photo.summary.json").read_text())
    assert summary["settings"]["tile"] == 96 and _report(out)["photo"]["status"] == "done"


def test_shards_split_the_cohort_and_claims_of_live_processes_are_left_alone(model, cohort, tmp_path):
    out = tmp_path / "out"
    inputs = [str(cohort / "slides"), str(cohort / "photo.png"), str(cohort / "scene.tif")]
    # Another live process (this one) holds photo; a process that is gone held scene.
    (out).mkdir()
    (out / "photo.tif.claim").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "scene.tif.claim").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    # Another machine's marker that has not been refreshed for longer than the timeout: taken over too.
    (out / "a").mkdir()
    stale = out / "a" / "case.tif.claim"
    stale.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert main(["segment", *inputs, "-o", str(out), "--shard", "1/2", *_args(model)]) == 0
    assert main(["segment", *inputs, "-o", str(out), "--shard", "2/2", *_args(model)]) == 0
    one = json.loads((out / "cohort.shard-1-of-2.json").read_text())
    two = json.loads((out / "cohort.shard-2-of-2.json").read_text())
    names = [r["name"] for r in one["rows"]] + [r["name"] for r in two["rows"]]
    assert sorted(names) == ["a/case", "b/case", "photo", "scene"]  # disjoint, complete; named below the folder given
    status = {r["name"]: r["status"] for r in one["rows"] + two["rows"]}
    assert status["photo"] == "running" and not (out / "photo.tif").exists()
    assert status["scene"] == "done" and not (out / "scene.tif.claim").exists()  # taken over, released
    assert status["a/case"] == "done" and not stale.exists()


def test_polygons_in_a_cohort_go_beside_each_class_map(model, cohort, tmp_path):
    images = [cohort / "scene.tif", cohort / "photo.png"]
    out = tmp_path / "out"
    assert main(["segment", *map(str, images), "-o", str(out), "--polygons", "geojson", *_args(model)]) == 0
    for image in images:
        single = tmp_path / "single" / f"{image.stem}.tif"
        assert main(["segment", str(image), "-o", str(single), "--polygons", "geojson", *_args(model)]) == 0
        ours = out / f"{image.stem}.polygons.geojson"
        assert ours.read_bytes() == single.with_name(f"{image.stem}.polygons.geojson").read_bytes()
        assert json.loads(ours.read_text())["features"]
    ours.unlink()  # an output missing: that image is done again, the other skipped
    assert main(["segment", *map(str, images), "-o", str(out), "--polygons", "geojson", *_args(model)]) == 0
    assert ours.exists() and _report(out)["photo"]["status"] == "done"


def test_a_detection_cohort_writes_each_images_objects_and_coco_results_beside_them(cohort, tmp_path):
    import torch
    from mmengine.config import Config

    from densevision.predictors.mmdet import MMDetPredictor

    classes = ("ship", "car")
    cfg = Config.fromfile(find_config("demo/dino_swin-tiny_demo-256")).model
    cfg["bbox_head"]["num_classes"] = len(classes)
    config, checkpoint = tmp_path / "det.py", tmp_path / "det.pth"
    Config({"model": cfg.to_dict(), "metainfo": {"classes": classes}}).dump(config)
    weights = MMDetPredictor.from_config(config).model.state_dict()
    torch.save({"state_dict": weights, "meta": {"dataset_meta": {"classes": classes}}}, checkpoint)
    args = ["-c", str(config), "-w", str(checkpoint), "--tile", "128", "--overlap", "16", "--score-threshold", "0.05"]
    images = [cohort / "scene.tif", cohort / "photo.png"]
    out = tmp_path / "out"
    assert main(["detect", *map(str, images), "-o", str(out), "--coco", "-q", *args]) == 0
    for image in images:
        single = tmp_path / "single" / f"{image.stem}.geojson"
        assert main(["detect", str(image), "-o", str(single), "--coco", "-q", *args]) == 0
        assert (out / f"{image.stem}.geojson").read_bytes() == single.read_bytes()
        assert (out / f"{image.stem}.coco.json").read_bytes() == single.with_suffix(".coco.json").read_bytes()
    rows = _report(out)
    assert {r["status"] for r in rows.values()} == {"done"}
    assert "ship count" in rows["scene"] and "ship area_m2" in rows["scene"]
    code = main(["detect", *map(str, images), "-o", str(out), "--coco", str(tmp_path / "one.json"), "-q", *args])
    assert code == 2  # one COCO file for many images: a usage error


@pytest.mark.slow
def test_sigkill_mid_cohort_then_the_same_command_finishes_with_the_same_bytes(model, cohort, singles, tmp_path):
    out = tmp_path / "out"
    slides = cohort / "slides"
    cmd = [sys.executable, "-m", "densevision.cli", "segment", str(slides), str(cohort / "scene.tif"), "-o", str(out)]
    cmd += [*_args(model), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.rglob("blocks-*.npz")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.rglob("*.partial.d")), "killed before any block was committed"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("slides/a/case", "slides/b/case", "scene"):
        assert (out / f"{name.removeprefix('slides/')}.tif").read_bytes() == singles[name], name
    assert not list(out.rglob("*.partial*")) and not list(out.rglob("*.claim"))


def test_torchrun_ranks_take_whole_images_each_exactly_once(model, cohort, one_process, tmp_path):
    """As the README writes it: ``torchrun --nproc_per_node 2 -m densevision.cli segment FOLDER -o OUT_DIR``."""
    out = tmp_path / "out"
    folder = tmp_path / "in"
    shutil.copytree(cohort, folder, ignore=shutil.ignore_patterns("corrupt.tif", "notes.tiff"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "densevision.cli", "segment", str(folder), "-o", str(out), *_args(model)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
    said = proc.stdout + proc.stderr  # a line per image goes above the progress bars, on standard error
    done = [line.split(":")[0].removeprefix("done ") for line in said.splitlines() if line.startswith("done ")]
    assert sorted(done) == sorted(GOOD)  # each image by one rank, once
    for name, reference in one_process.items():
        assert (out / f"{name}.tif").read_bytes() == reference, name
    assert proc.stdout.count("cohort: 4 of 4 done") == 1  # rank 0 reports
    assert not list(out.rglob("*.claim"))


@pytest.mark.slow
def test_two_nodes_with_a_c10d_rendezvous_share_one_cohort(model, cohort, one_process, tmp_path):
    """``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` on each machine (here both on this one):
    the ranks of both draw from the rendezvous store's counter."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    folder = tmp_path / "in"
    shutil.copytree(cohort, folder, ignore=shutil.ignore_patterns("corrupt.tif", "notes.tiff"))
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cohort-test",
            "-m", "densevision.cli", "segment", str(folder), "-o", str(out), *_args(model)]  # fmt: skip
    procs = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    said = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in said]
    lines = [ln for o, e in said for ln in (o + e).splitlines()]
    done = [ln.split(":")[0].removeprefix("done ") for ln in lines if ln.startswith("done ")]
    assert sorted(done) == sorted(GOOD)
    for name, reference in one_process.items():
        assert (out / f"{name}.tif").read_bytes() == reference, name


def test_a_large_image_is_split_across_the_ranks_of_a_torchrun(model, cohort, one_process, tmp_path):
    out = tmp_path / "out"
    inputs = [str(cohort / "photo.png"), str(cohort / "scene.tif")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "densevision.cli", "segment", *inputs, "-o", str(out), "--split-above", "0.02",
         *_args(model)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
    scene = json.loads((out / "scene.summary.json").read_text())  # 200 x 170 > 0.02 MP: both ranks
    photo = json.loads((out / "photo.summary.json").read_text())  # 120 x 90 < 0.02 MP: one rank
    assert scene["settings"]["world_size"] == 2 and photo["settings"]["world_size"] == 1
    assert (out / "scene.tif").read_bytes() == one_process["scene"]
    assert (out / "photo.tif").read_bytes() == one_process["photo"]


def test_bands_are_checked_against_the_models_channels_before_any_tile(model, tmp_path, capsys):
    import rasterio
    from rasterio.transform import from_origin

    def raster(path: Path, bands: int) -> Path:
        data = np.random.default_rng(0).integers(1, 255, (bands, 80, 90), dtype=np.uint8)
        profile = dict(driver="GTiff", width=90, height=80, count=bands, dtype="uint8", crs="EPSG:32618",
                       transform=from_origin(0, 0, 1, 1), photometric="minisblack")  # fmt: skip  # RGB + NIR, no alpha
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(data)
        return path

    four, one = raster(tmp_path / "four.tif", 4), raster(tmp_path / "one.tif", 1)
    for image, says in ((four, "4 band(s) would be fed to a model that takes 3"), (one, "--bands 1 1 1")):
        out = tmp_path / f"{image.stem}-out.tif"
        assert main(["segment", str(image), "-o", str(out), *_args(model)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob("*.partial*"))
    assert main(["segment", str(one), "-o", str(tmp_path / "ok.tif"), "--bands", "1", "1", "1", *_args(model)]) == 0
