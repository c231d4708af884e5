"""Damaged files: generated slides and rasters cut short or overwritten at many offsets are either refused with one
typed, one-line error, or read into exactly the pixels of the good file, never into other pixels (the one exception,
stated and bounded: JPEG has no checksum, so overwritten JPEG entropy data can decode into other pixels of that same
tile). Through the command as users type it: one line ``densevision: error: ...``, exit 2, nothing that looks
finished."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from densevision import open_image
from densevision.cli import main
from densevision.errors import CorruptImageError, DenseVisionError
from densevision.synthetic.damage import TileBytes, overwritten, tiff_tiles, truncated
from densevision.synthetic.rasters import make_geotiff
from densevision.synthetic.slides import make_slide

CONFIG = "demo/upernet_swin-tiny_demo-256"  # the cheapest shipped segmentation config (random weights: seconds)


@dataclass
class Read:
    """Everything a run reads from a file: its levels' sizes, a thumbnail and every level whole."""

    dimensions: tuple[tuple[int, int], ...]
    thumbnail: np.ndarray
    levels: list[tuple[np.ndarray, np.ndarray]]  # (pixels, valid) per level


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging."""

    def stop(*_: object) -> None:
        raise TimeoutError(f"the read did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_everything(path: Path) -> Read:
    with deadline(60), open_image(path) as src:
        thumb = src.thumbnail(64)
        levels = [src.read_region((0, 0), lv, src.level_dimensions[lv]) for lv in range(src.level_count)]
        return Read(src.level_dimensions, thumb.pixels, [(r.pixels, r.valid) for r in levels])


@dataclass
class Sample:
    path: Path
    good: Read
    tiles: list[TileBytes]
    jpeg: bool  # tiles without a checksum


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Sample]:
    """A JPEG slide (OpenSlide), a deflate GeoTIFF with overviews (GDAL), a deflate TIFF without georeference
    (OpenSlide generic-tiff): small, tiled, compressed, levels in directory order."""
    root = tmp_path_factory.mktemp("good")
    slide, raster, plain = root / "slide.tiff", root / "scene.tif", root / "plain.tif"
    make_slide(slide, 400, 300, tile_size=128)
    make_geotiff(raster, 400, 300, tile=128)
    rng = np.random.default_rng(0)
    tifffile.imwrite(plain, rng.integers(0, 8, (300, 400, 3), dtype=np.uint8) * 32, tile=(128, 128),
                     compression="zlib", photometric="rgb")  # fmt: skip
    out = {}
    for name, path, jpeg in (("slide", slide, True), ("raster", raster, False), ("plain", plain, False)):
        good = read_everything(path)
        tiles = tiff_tiles(path)
        # Directory i is level i in these files: damage to a tile of directory i can only reach level i.
        assert [(t.width, t.height) for t in tiles if t.index == 0] == [
            good.dimensions[t.page] for t in sorted(tiles, key=lambda t: t.page) if t.index == 0
        ]
        out[name] = Sample(path, good, tiles, jpeg)
    assert open_image(slide).backend == "openslide" and open_image(raster).backend == "rasterio"
    assert open_image(plain).backend == "openslide"
    return out


def outcome(sample: Sample, damaged: Path, hit: range) -> str:
    """``refused`` (a one-line DenseVisionError naming the file), ``same`` (every pixel as in the good file),
    ``levels dropped`` (reduced levels missing, the rest the same) or ``jpeg tile`` (JPEG data overwritten: only the
    hit tiles' pixels differ); anything else fails the test."""
    try:
        got = read_everything(damaged)
    except DenseVisionError as e:
        message = str(e)
        assert "\n" not in message and damaged.name in message, message
        assert "re-copy" in message or "re-export" in message or "not a" in message, message
        return "refused"
    good = sample.good
    # A backend may drop a reduced level whose directory it cannot use (OpenSlide, for a zeroed BitsPerSample):
    # the levels it keeps must still be the good file's, and level 0 must be there.
    assert got.dimensions == good.dimensions[: len(got.dimensions)] and got.dimensions
    tiles_hit = [t for t in sample.tiles if t.start < hit.stop and hit.start < t.stop]
    differs = False
    for level, ((pixels, valid), (good_pixels, good_valid)) in enumerate(zip(got.levels, good.levels, strict=False)):
        assert pixels.shape == good_pixels.shape and pixels.dtype == good_pixels.dtype
        changed = (pixels != good_pixels).any(axis=-1) | (valid != good_valid)
        if not changed.any():
            continue
        differs = True
        assert sample.jpeg, f"{damaged.name}: bytes {hit.start}..{hit.stop} changed level {level}'s pixels silently"
        inside = np.zeros_like(changed)
        for t in tiles_hit:
            if t.page == level:
                inside[t.y0 : t.y1, t.x0 : t.x1] = True
        assert not (changed & ~inside).any(), f"{damaged.name}: damage at {hit.start} reached other tiles"
    if differs:
        return "jpeg tile"
    if got.dimensions != good.dimensions:
        return "levels dropped"
    np.testing.assert_array_equal(got.thumbnail, good.thumbnail)
    return "same"


def junk(k: int) -> bytes:
    return b"\xff" * 16 if k % 2 else bytes(16)


def directory_offsets(sample: Sample, n: int) -> list[int]:
    """``n`` offsets spread over the bytes that are not tile data: header, directories, tag values."""
    size = sample.path.stat().st_size
    in_tiles = np.zeros(size, dtype=bool)
    for t in sample.tiles:
        in_tiles[t.start : t.stop] = True
    free = np.flatnonzero(~in_tiles[: size - 16])
    return [int(o) for o in free[np.linspace(0, len(free) - 1, n).astype(int)]]


def tile_offsets(sample: Sample, n: int) -> list[int]:
    """``n`` offsets spread evenly over the tiles' compressed bytes (every level), each with 16 bytes left in its
    tile, and the first bytes of a few tiles (a JPEG stream's header)."""
    starts = [t.start for t in sample.tiles[:: max(1, len(sample.tiles) // 6)]]
    spans = np.concatenate([np.arange(t.start, t.stop - 16) for t in sample.tiles])
    return starts + [int(o) for o in spans[np.linspace(0, len(spans) - 1, n - len(starts)).astype(int)]]


@pytest.mark.parametrize("name", ["slide", "raster", "plain"])
def test_truncated_copies_are_refused(samples, tmp_path, name):
    sample = samples[name]
    size = sample.path.stat().st_size
    seen = []
    for length in [8, 64, *np.linspace(200, size - 1, 14).astype(int).tolist()]:
        damaged = truncated(sample.path, tmp_path / f"cut-{length}{sample.path.suffix}", length)
        seen.append(outcome(sample, damaged, range(length, size)))
    # A copy cut short always loses pixels of the last level or a directory: it is never read as if whole.
    assert seen == ["refused"] * len(seen)


@pytest.mark.parametrize("name", ["slide", "raster", "plain"])
def test_bytes_overwritten_inside_tiles_are_refused_or_change_nothing(samples, tmp_path, name):
    sample = samples[name]
    seen = {}
    for k, offset in enumerate(tile_offsets(sample, 40)):
        damaged = overwritten(sample.path, tmp_path / f"tile-{offset}{sample.path.suffix}", offset, junk(k))
        seen[offset] = outcome(sample, damaged, range(offset, offset + 16))
    assert "refused" in seen.values()
    if not sample.jpeg:  # deflate carries a checksum: nothing decodes into other pixels
        assert "jpeg tile" not in seen.values()


@pytest.mark.parametrize("name", ["slide", "raster", "plain"])
def test_bytes_overwritten_inside_the_directories_are_refused_or_change_nothing(samples, tmp_path, name):
    sample = samples[name]
    seen = {}
    for k, offset in enumerate(directory_offsets(sample, 30)):
        damaged = overwritten(sample.path, tmp_path / f"ifd-{offset}{sample.path.suffix}", offset, junk(k))
        seen[offset] = outcome(sample, damaged, range(offset, offset + 16))
    assert "refused" in seen.values()
    assert "jpeg tile" not in seen.values()  # a directory's damage reads as a whole-image change or not at all


def test_gdal_alone_decodes_an_overwritten_deflate_tile_into_other_pixels(samples, tmp_path):
    """Negative control for the Adler-32 check: without it, GDAL reads overwritten deflate tiles as other pixels."""
    sample = samples["raster"]
    silent = 0
    for k, offset in enumerate(tile_offsets(sample, 20)):
        damaged = overwritten(sample.path, tmp_path / f"t-{offset}.tif", offset, junk(k))
        with contextlib.suppress(DenseVisionError), open_image(damaged, verify_checksums=False) as src:
            region = src.read_region((0, 0), 0, src.size)
            silent += bool((region.pixels != sample.good.levels[0][0]).any())
    assert silent > 0


def test_a_damaged_tile_is_named_and_the_other_tiles_still_read(samples, tmp_path):
    sample = samples["raster"]
    tile = next(t for t in sample.tiles if t.page == 0 and t.index == 5)  # column 1, row 1 of level 0
    damaged = overwritten(sample.path, tmp_path / "one-tile.tif", (tile.start + tile.stop) // 2, b"\xff" * 16)
    with open_image(damaged) as src:
        with pytest.raises(CorruptImageError, match=r"window at \(128, 128\) \(level 0.*column 1, row 1.*re-copy"):
            src.read_region((128, 128), 0, (128, 128))
        good = src.read_region((0, 0), 0, (128, 128))
        np.testing.assert_array_equal(good.pixels, sample.good.levels[0][0][:128, :128])


# ---- the commands, as users type them -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_with_bad_tiles(tmp_path_factory) -> dict[str, Path]:
    """A 2048 x 256 GeoTIFF (the thumbnail reads overview 1) with one damaged tile in level 0 (read only by the
    tiles), one with a damaged overview tile (read by the thumbnail), and one cut short."""
    root = tmp_path_factory.mktemp("scene")
    good = root / "scene.tif"
    make_geotiff(good, 2048, 256, tile=128)
    tiles = tiff_tiles(good)
    level0 = next(t for t in tiles if t.page == 0 and t.index == 5)
    overview = next(t for t in tiles if t.page == 1 and t.index == 2)
    return {
        "good": good,
        "tile": overwritten(good, root / "bad-tile.tif", (level0.start + level0.stop) // 2, b"\xff" * 16),
        "thumbnail": overwritten(good, root / "bad-overview.tif", (overview.start + overview.stop) // 2, bytes(16)),
        "truncated": truncated(good, root / "cut.tif", good.stat().st_size // 2),
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_tile_read_by_a_worker_process_keeps_its_one_line_message(scene_with_bad_tiles, tmp_path, workers):
    """A DataLoader rebuilds a worker's exception from its whole traceback; the reader gives back the worker's own
    message, the same as when the main process reads the tile."""
    import torch

    from densevision import segment_image

    class Zero(torch.nn.Module):
        num_classes, class_names, palette, size_divisor = 2, ("a", "b"), ((0, 0, 0), (255, 255, 255)), 16
        device = torch.device("cpu")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    out = tmp_path / "seg.tif"
    with pytest.raises(CorruptImageError) as exc:
        segment_image(scene_with_bad_tiles["tile"], predictor=Zero(), out=out, tile=128, overlap=16,
                      workers=workers, progress=False)  # fmt: skip
    message = str(exc.value)
    assert message.startswith(f"{scene_with_bad_tiles['tile']}: cannot read the window at (560, 0) (level 0")
    assert "\n" not in message and "DataLoader" not in message
    assert not out.exists()


def test_a_damaged_tile_fails_in_every_loader_of_a_dataset_whose_workers_share_the_checks(scene_with_bad_tiles):
    # Workers share which tiles checked out; a tile that failed is not among them, so the next block's loader (new
    # workers) and the process that made the dataset refuse it again, with the same one-line message.
    from densevision.engine import TileDataset, read_geometry, tile_loader
    from densevision.tiling import TileGrid

    path = scene_with_bad_tiles["tile"]
    with open_image(path) as src:
        grid, geometry = TileGrid(*src.size, 128, overlap=16), read_geometry(src)
    dataset = TileDataset(path, list(grid), geometry)
    window = r"the window at \(560, 0\) \(level 0.*column 5, row 0 .* re-export or re-copy it$"
    says = rf"^{re.escape(str(path))}: cannot read {window}"
    for _ in range(2):
        with pytest.raises(CorruptImageError, match=says):
            for _ in tile_loader(dataset, batch_size=1, workers=2):
                pass
    with pytest.raises(CorruptImageError, match=says):
        dataset[next(t.index for t in grid if (t.x, t.y) == (560, 0))]


def assert_failed_cleanly(code: int, err: str, out: Path, image: Path, says: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("densevision: error: ") and image.name in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not out.with_name(out.stem + ".summary.json").exists()
    assert not out.with_name(out.stem + ".preview.png").exists()
    left = [p.name for p in out.parent.iterdir() if p.name not in (out.stem + ".log",)]
    assert all(".partial" in name for name in left), left  # a work folder may stay, named as partial


@pytest.mark.parametrize(
    ("which", "says"),
    [
        ("tile", "deflate tile at column 5, row 0 of the 2048 x 256 level"),
        ("thumbnail", "the thumbnail"),
        ("truncated", "truncated"),
    ],
)
def test_segment_on_a_damaged_scene_is_one_line_and_exit_2(scene_with_bad_tiles, tmp_path, capsys, which, says):
    image = scene_with_bad_tiles[which]
    out = tmp_path / "out" / "seg.tif"
    code = main(["segment", str(image), "-c", CONFIG, "-o", str(out), "--tile", "128", "--overlap", "16", "-q"])
    assert_failed_cleanly(code, capsys.readouterr().err, out, image, says)


def test_segment_command_in_a_shell_on_a_damaged_slide(samples, tmp_path):
    """As typed: a subprocess, so nothing of pytest's captures hides a traceback or a library's stderr."""
    sample = samples["slide"]
    tile = next(t for t in sample.tiles if t.page == 0 and t.index == 5)
    image = overwritten(sample.path, tmp_path / "bad.tiff", tile.start + 2, b"\xff" * 16)  # its JPEG header
    out = tmp_path / "out" / "seg.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "densevision.cli", "segment", str(image), "-c", CONFIG, "-o", str(out),
         "--tile", "128", "--overlap", "16", "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_failed_cleanly(proc.returncode, proc.stderr, out, image, "cannot read")


def test_info_on_damaged_files_prints_facts_or_one_line(scene_with_bad_tiles, capsys):
    """``info`` reads the directories, not the pixels: a damaged tile still has facts; a cut file is refused."""
    assert main(["info", "--json", str(scene_with_bad_tiles["tile"])]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == [2048, 256]
    image = scene_with_bad_tiles["truncated"]
    assert main(["info", str(image)]) == 2
    said = capsys.readouterr()
    assert said.out == ""
    lines = said.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densevision: error: ") and image.name in lines[0]
