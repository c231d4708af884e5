"""The disk filling up mid-image: a small tmpfs as the output folder. The run ends with one typed line naming the
file system and what to do, leaves nothing that looks finished, and once space is freed a ``--resume`` run completes
with the bytes of an uninterrupted run."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from densevision import segment_image
from densevision.errors import DiskFullError, OutputError
from densevision.io.atomic import as_output_error, disk_errors, mount_point, replacing
from densevision.io.writers import GeoTiffWriter, PyramidTiffWriter
from densevision.synthetic.rasters import make_geotiff


class Conv(torch.nn.Module):
    """Cheap, deterministic, with outputs that do not compress to nothing."""

    num_classes, class_names = 4, ("a", "b", "c", "d")
    palette, size_divisor, device = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)), 16, torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255.0)


SETTINGS = dict(tile=128, overlap=16, batch_size=4, workers=0, progress=False, probability_output=True)


@contextlib.contextmanager
def tmpfs(folder: Path, kib: int) -> Iterator[Path]:
    """A tmpfs of ``kib`` KiB mounted on ``folder`` (created); skips the test where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount(folder: Path, kib: int) -> None:
    """Make the tmpfs on ``folder`` bigger, keeping its files (space freed, as a user would)."""
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(folder)], check=True)


def du(folder: Path) -> int:
    """Bytes the files under ``folder`` take, in 4 KiB pages as tmpfs counts them."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    make_geotiff(path, 768, 640, tile=128, overviews=False)
    return path


@pytest.fixture(scope="module")
def uninterrupted(scene, tmp_path_factory) -> dict[str, object]:
    """The outputs of a run with room to spare, and how much room its work folder and its outputs took."""
    root = tmp_path_factory.mktemp("whole")
    out = root / "seg.tif"
    kept: list[int] = []
    from densevision.engine import workdir

    remove = workdir.WorkFolder.remove

    def measure(self):  # the work folder at its fullest: every row committed, just before it is removed
        kept.append(du(self.root))
        remove(self)

    workdir.WorkFolder.remove = measure
    try:
        segment_image(scene, out=out, predictor=Conv(), **SETTINGS)
    finally:
        workdir.WorkFolder.remove = remove
    outputs = {p.name: p.read_bytes() for p in (out, out.with_name("seg.probs.tif"))}
    return {"work": kept[0], "outputs": outputs, "output_bytes": du(root)}


def assert_nothing_finished(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert "seg.tif" not in names and "seg.probs.tif" not in names and "seg.summary.json" not in names, names
    assert "seg.preview.png" not in names, names
    assert all(".partial" in n for n in names), names  # only the work folder, named as partial


@pytest.mark.parametrize("where", ["work folder", "writers"])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_gives_the_same_bytes(scene, uninterrupted, tmp_path, where):
    work, output = int(uninterrupted["work"]), int(uninterrupted["output_bytes"])
    assert work > 64 * 1024, "the work folder must be big enough to fill a tmpfs half way"
    # Half the work folder: full while committing block rows. All of it and a little: full while writing outputs.
    kib = work // 2 // 1024 if where == "work folder" else (work + output // 3) // 1024
    with tmpfs(tmp_path / "disk", kib) as disk:
        out = disk / "seg.tif"
        with pytest.raises(DiskFullError) as exc:
            segment_image(scene, out=out, predictor=Conv(), **SETTINGS)
        message = str(exc.value)
        assert "\n" not in message
        assert message.startswith(f"no space left on device on {disk} (writing {disk}/seg.")
        assert message.endswith("free space and run again with --resume")
        writing = message.split("(writing ", 1)[1].split(")", 1)[0]
        assert ("seg.tif.partial.d/blocks-" in writing) == (where == "work folder"), writing
        assert isinstance(exc.value, OutputError) and exc.value.__cause__ is not None
        assert_nothing_finished(disk)
        assert (disk / "seg.tif.partial.d").is_dir()  # what was committed is kept for --resume
        remount(disk, 4 * (work + output) // 1024 + 1024)
        summary = segment_image(scene, out=out, predictor=Conv(), resume=True, **SETTINGS)
        assert summary["resumed"]["rows_already_done"] >= (1 if where == "writers" else 0)
        for name, data in uninterrupted["outputs"].items():  # type: ignore[union-attr]
            assert (disk / name).read_bytes() == data, name
        assert not (disk / "seg.tif.partial.d").exists()
        assert not any(".partial" in p.name for p in disk.iterdir())


def test_the_segment_command_on_a_full_disk_is_one_line_and_exit_2(scene, tmp_path, capsys):
    from densevision.cli import main

    with tmpfs(tmp_path / "disk", 64) as disk:
        (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # leaves about one page
        out = disk / "seg.tif"
        code = main(["segment", str(scene), "-c", "demo/upernet_swin-tiny_demo-256", "-o", str(out), "--tile",
                     "128", "--overlap", "16", "-q"])  # fmt: skip
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith(f"densevision: error: no space left on device on {disk}"), err
        assert "Traceback" not in err
        assert not out.exists() and not (disk / "seg.summary.json").exists()


# ---- the helper, and each writer on a full disk ------------------------------------------------------------------


def test_disk_errors_names_the_mount_point_and_tells_what_to_do(tmp_path):
    path = tmp_path / "out.tif"
    said = rf"^no space left on device on {mount_point(path)} \(writing {path}\): free space and run again"
    with pytest.raises(DiskFullError, match=said), disk_errors(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(DiskFullError), disk_errors(path):  # GDAL says it in words, without an errno
        raise OSError("TIFFAppendToStrip: Free disk space available is 0 bytes")
    # Negative control: another failure is an OutputError, not a full disk.
    error = as_output_error(PermissionError(errno.EACCES, "Permission denied"), path)
    assert type(error) is OutputError and "Permission denied" in str(error)
    with pytest.raises(PermissionError), replacing(path):  # replacing converts only a full disk
        raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("writer", ["geotiff", "cog", "pyramid"])
def test_each_raster_writer_on_a_full_disk_raises_and_leaves_nothing(tmp_path, writer):
    """GDAL only logs a block it cannot write: without a check of the written file, a truncated GeoTIFF was renamed
    into place as if finished."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (1024, 1024), dtype=np.uint8)
    with tmpfs(tmp_path / "disk", 256) as disk:
        out = disk / "o.tif"
        with pytest.raises(DiskFullError, match=rf"no space left on device on {disk} \(writing {disk}/o\.tif"):
            if writer == "pyramid":
                w: GeoTiffWriter | PyramidTiffWriter = PyramidTiffWriter(out, 1024, 1024)
            else:
                w = GeoTiffWriter(out, 1024, 1024, cog=writer == "cog")
            with w:
                for y in range(0, 1024, 256):
                    w.write(data[y : y + 256], 0, y)
        assert list(disk.iterdir()) == []


def test_a_cohort_on_a_disk_that_fills_stops_in_one_line_and_the_same_call_finishes_it(scene, uninterrupted, tmp_path):
    """Room for the first image only: the cohort stops at the second with the disk named (every later image would
    fail the same way); once space is freed the same call skips the first and completes the second, same bytes."""
    import shutil

    from densevision import run_cohort

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.tif", "b.tif"):
        shutil.copy(scene, inputs / name)
    work, output = int(uninterrupted["work"]), int(uninterrupted["output_bytes"])
    with tmpfs(tmp_path / "disk", (output + work + output // 2) // 1024) as disk:
        with pytest.raises(DiskFullError, match=f"no space left on device on {disk}"):
            run_cohort(inputs, disk, "segment", predictor=Conv(), **SETTINGS)
        assert (disk / "a.tif").read_bytes() == uninterrupted["outputs"]["seg.tif"]  # type: ignore[index]
        assert not (disk / "b.tif").exists() and not (disk / "b.summary.json").exists()
        remount(disk, 4 * (work + 2 * output) // 1024 + 1024)
        result = run_cohort(inputs, disk, "segment", predictor=Conv(), **SETTINGS)
        assert result["counts"]["done"] == 2 and result["already_done"] == 1
        for name in ("a", "b"):
            assert (disk / f"{name}.tif").read_bytes() == uninterrupted["outputs"]["seg.tif"]  # type: ignore[index]
            assert (disk / f"{name}.probs.tif").read_bytes() == uninterrupted["outputs"]["seg.probs.tif"]  # type: ignore[index]
        assert not any(".partial" in p.name or p.suffix == ".claim" for p in disk.rglob("*"))
