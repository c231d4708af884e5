"""Tiles read by DataLoader workers, each with its own handle, equal direct reads at the working resolution."""

from __future__ import annotations

import fcntl
import os
import pickle
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from densevision import open_image
from densevision.engine import TileDataset, read_geometry, tile_loader
from densevision.engine.reader import reader_runs
from densevision.errors import ConfigError, MissingResolutionError
from densevision.io import decode
from densevision.io.scaling import ValueScale
from densevision.stitch.segmentation import stitch_order
from densevision.synthetic.damage import tiff_tiles
from densevision.synthetic.rasters import make_geotiff
from densevision.tiling import TileGrid


@pytest.mark.parametrize(
    ("workers", "batch_size", "pinned", "slow"),
    [(0, 4, False, False), (2, 4, False, False), (2, 3, False, True), (2, 1, False, True), (2, 4, True, False)],
)
def test_workers_read_the_same_tiles(data_dir, workers, batch_size, pinned, slow):
    # Batches cut across the workers' runs (3 + 2 tiles a row here); a slow consumer lets the workers run as far
    # ahead as they may, so a shared slot rewritten too early would show as another tile's pixels. Pinned: runs
    # cross the DataLoader's way (pinning is skipped without CUDA).
    path = data_dir / "wsi/CMU-1-Small-Region.svs"
    with open_image(path) as src:
        grid = TileGrid(*src.size, 512, overlap=64)
        geometry = read_geometry(src)
        expected = {t.index: src.read_region((t.x, t.y), 0, (512, 512)) for t in grid}
    dataset = TileDataset(path, list(grid), geometry)
    seen, sizes = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true but no accelerator")
        for batch in tile_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=pinned):
            if slow:
                time.sleep(0.05)
            pixels, valid = batch.pixels, batch.valid
            assert pixels.shape[1:] == (3, 512, 512) and valid.shape[1:] == (512, 512)
            assert pixels.dtype == torch.uint8  # a uint8 source crosses as uint8; the device converts
            for i, p, v in zip(batch.index, pixels, valid, strict=True):
                np.testing.assert_array_equal(p.numpy().transpose(1, 2, 0), expected[i].pixels)
                np.testing.assert_array_equal(v, expected[i].valid)
                seen.append(i)
            sizes.append(len(batch))
    assert seen == [t.index for t in grid]  # in order, each once
    n = len(grid)
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])


def test_tiles_in_the_stitching_order_cross_the_shared_slots_intact(tmp_path):
    # The stitching order interleaves the last two tile rows (the last is shifted inward): one tile a run, every
    # other run empty. A batch then spans runs far apart: the slots must be counted by runs with tiles, or a worker
    # running ahead overwrites tiles still waiting in the batch (found by the cohort tests: outputs that differed).
    path = tmp_path / "scene.tif"
    make_geotiff(path, 200, 170, tile=128, seed=3)
    with open_image(path) as src:
        grid, geometry = TileGrid(*src.size, 64, overlap=16), read_geometry(src)
    order = stitch_order(grid)
    assert [t.row for t in order][8:] == [2, 3, 2, 3, 2, 3, 2, 3]
    dataset = TileDataset(path, order, geometry)
    expected = {t.index: dataset[i][1] for i, t in enumerate(order)}
    seen = []
    for batch in tile_loader(dataset, batch_size=4, workers=2, prefetch=2):
        time.sleep(0.05)
        for i, pixels in zip(batch.index, batch.pixels, strict=True):
            assert torch.equal(pixels, expected[i]), i
            seen.append(i)
    assert seen == [t.index for t in order]


def test_reader_runs_keep_each_worker_on_the_same_columns_row_after_row():
    # 2 + 1 tile rows of a 23-column grid, some tiles skipped (a row's first tiles among them): each row is cut into
    # the same number of runs, a multiple of the workers, none longer than allowed; run k is worker k % 3's.
    grid = TileGrid(23 * 100 + 28, 3 * 100 + 28, 128, overlap=28)
    tiles = [t for t in grid if (not (t.row == 1 and t.col in (0, 1, 7, 8, 9)) and t.row != 2) or t.col == 5]
    runs = reader_runs(tiles, 3, most=4)
    assert [i for run in runs for i in run] == list(range(len(tiles)))
    rows = [runs[k : k + 6] for k in range(0, len(runs), 6)]  # 3 workers * ceil(23 / (3 * 4)) runs a row
    assert len(runs) == 6 * 3 and all(len(run) <= 4 for run in runs)
    columns = [[{tiles[i].col for i in run} for run in row] for row in rows]
    assert all(len({tiles[i].row for i in run}) <= 1 for run in runs)
    for row in columns[1:]:
        for full, part in zip(columns[0], row, strict=True):
            assert part <= full  # worker k % 3 reads the same columns as in the first (full) row, or fewer
    assert columns[1][0] == {2, 3} and columns[2] == [set(), {5}, set(), set(), set(), set()]


def test_reader_runs_cut_an_interleaved_pair_of_rows_into_bands_of_both_rows():
    # 8192² at 512 / 64: 19 columns, the last row shifted inward, so the stitching order feeds the last two rows
    # column by column. Their runs hold both rows' tiles of adjacent columns, none empty, none longer than allowed;
    # the single rows before them keep their bands.
    grid = TileGrid(8192, 8192, 512, overlap=64)
    tiles = stitch_order(grid)
    pair = [t.row for t in tiles[-4:]]
    assert pair == [17, 18, 17, 18]  # interleaved (checked, not assumed)
    runs = reader_runs(tiles, 2, most=8)
    assert [i for run in runs for i in run] == list(range(len(tiles)))
    single = [run for run in runs if run and tiles[run[0]].row < 17]
    paired = [run for run in runs if run and tiles[run[0]].row >= 17]
    assert len(runs) == len(single) + len(paired)  # no empty run anywhere
    assert all(len(run) <= 8 for run in runs) and len(single) == 17 * 4
    assert all({tiles[i].row for i in run} == {17, 18} for run in paired)
    assert [sorted({tiles[i].col for i in run}) for run in paired][:2] == [[0, 1, 2, 3], [4, 5, 6]]


def test_inflating_checks_the_adler32_and_leaves_the_last_word_to_zlib():
    data = np.arange(64 * 64 * 3, dtype=np.uint8).tobytes()
    stream = zlib.compress(data)
    decode.inflate(stream, len(data))
    decode.inflate(stream, 16)  # more bytes than expected: libdeflate refuses, zlib decides (it checks out)
    damaged = stream[:-1] + bytes([stream[-1] ^ 1])  # the Adler-32's last byte
    with pytest.raises(zlib.error, match="incorrect data check"):
        decode.inflate(damaged, len(data))


def log_inflates(monkeypatch, log: Path) -> None:
    """Make every checksum inflate append the CRC-32 of the tile's bytes to ``log``, from whichever process inflates
    (the patches cross the workers' fork; each line is one small append). Checks run one at a time across the
    processes, so that two workers never race to check one tile (harmless, but both would inflate it)."""

    inflate = decode.inflate

    def logged(raw: bytes, size: int) -> None:
        with open(log, "a") as f:
            f.write(f"{zlib.crc32(raw)}\n")
        inflate(raw, size)

    verify = decode.DeflateChecksums.verify

    def one_at_a_time(self: decode.DeflateChecksums, *args: Any) -> None:
        with open(log.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            verify(self, *args)

    monkeypatch.setattr(decode, "inflate", logged)
    monkeypatch.setattr(decode.DeflateChecksums, "verify", one_at_a_time)


def inflates(log: Path) -> Counter[int]:
    return Counter(int(line) for line in log.read_text().split()) if log.exists() else Counter()


@pytest.fixture(scope="module")
def deflate_scene(tmp_path_factory) -> tuple[Path, Counter[int]]:
    """A 600 x 500 deflate GeoTIFF in 128-px tiles (partial edge tiles), and the CRC-32s of its level-0 tiles."""
    path = tmp_path_factory.mktemp("deflate") / "scene.tif"
    make_geotiff(path, 600, 500, tile=128)
    raw = path.read_bytes()
    return path, Counter(zlib.crc32(raw[t.start : t.stop]) for t in tiff_tiles(path) if t.page == 0)


def test_each_deflate_tile_is_verified_once_across_the_workers(deflate_scene, monkeypatch, tmp_path):
    # The two workers read adjacent runs of windows, and the 16-px overlap makes the windows where their runs meet
    # share TIFF tiles: per-worker flags inflate those tiles in both workers.
    path, level0 = deflate_scene
    with open_image(path) as src:
        grid, geometry = TileGrid(*src.size, 128, overlap=16), read_geometry(src)
    log = tmp_path / "inflates.log"
    log_inflates(monkeypatch, log)
    dataset = TileDataset(path, list(grid), geometry)
    for _ in tile_loader(dataset, batch_size=1, workers=2):
        pass
    assert inflates(log) == level0
    for _ in tile_loader(dataset, batch_size=1, workers=2):  # the next block's loader, with new workers
        pass
    dataset[0]  # and the process that made the dataset
    assert inflates(log) == level0

    log.unlink()  # negative control: workers forked without shared flags each verify what they read
    for _ in DataLoader(TileDataset(path, list(grid), geometry), batch_size=1, num_workers=2):
        pass
    assert inflates(log).total() > level0.total() and set(inflates(log)) == set(level0)


@pytest.mark.parametrize("open_options", [{}, {"verify_checksums": False}])
def test_a_pickled_dataset_keeps_its_own_flags_and_reads_the_same(deflate_scene, monkeypatch, tmp_path, open_options):
    # A spawned worker gets the dataset pickled: no shared mapping crosses, so it verifies what it reads itself.
    path, level0 = deflate_scene
    with open_image(path) as src:
        grid, geometry = TileGrid(*src.size, 128, overlap=16), read_geometry(src)
    log = tmp_path / "inflates.log"
    log_inflates(monkeypatch, log)
    dataset = TileDataset(path, list(grid), geometry, open_options)
    dataset.share_checksums()
    copy = pickle.loads(pickle.dumps(dataset))
    for i in range(len(grid)):
        np.testing.assert_array_equal(copy[i][1], dataset[i][1])
    assert inflates(log) == (Counter() if open_options else level0 + level0)


def test_scaled_pixels_cross_as_float32_with_the_scaled_values(data_dir):
    # A value scale (non-uint8 sources are stretched to 0..255) keeps float32, so its fractions are not rounded.
    path = data_dir / "wsi/CMU-1-Small-Region.svs"
    with open_image(path) as src:
        grid = TileGrid(*src.size, 512, overlap=64)
        geometry = read_geometry(src)
        tile = next(iter(grid))
        raw = src.read_region((tile.x, tile.y), 0, (512, 512)).pixels
    scale = ValueScale.uniform(10.0, 200.0, 3)
    _, plain, _ = TileDataset(path, [tile], geometry)[0]
    _, scaled, _ = TileDataset(path, [tile], geometry, value_scale=scale)[0]
    assert plain.dtype == torch.uint8 and scaled.dtype == torch.float32
    np.testing.assert_array_equal(plain.numpy().transpose(1, 2, 0), raw)
    np.testing.assert_array_equal(scaled.numpy().transpose(1, 2, 0), scale(raw))
    assert not np.array_equal(scaled.numpy(), np.round(scaled.numpy()))  # fractions survive


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


# Rows of tiles as a run has them: each tile's read (192..768 KB uint8) and logits (0.5..2 MB float32, 2 classes)
# are freed when the row is done, while each tile's small detection record (0.5..8 KB) stays, as the merger's and
# the work folder's do. Before the rows, a freed 8 MB block (a finished band) has raised glibc's dynamic mmap
# threshold to 8 MB, so by default the tile arrays come from the heap and, pinned there by the records, their
# freed pages stay resident. Prints the growth of resident memory (/proc/self/statm) over the rows and one row's size.
_TILE_ROWS = """
import json, os, sys
import numpy as np
from densevision.engine.heap import bound_heap_growth, release_freed_memory

fixed = sys.argv[1] == "bounded" and bound_heap_growth()
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

rng = np.random.default_rng(0)
band = np.ones(8 << 20, np.uint8)
del band
start, kept, row_bytes = rss(), [], []
for r in range(8):
    row = []
    for c in range(16):
        h, w = rng.integers(256, 513, 2)
        row.append(np.ones((h, w, 3), np.uint8))
        row.append(np.ones((2, h, w), np.float32))
        kept.append(np.ones(int(rng.integers(64, 1025)) * 8, np.uint8))
    row_bytes.append(sum(a.nbytes for a in row))
    del row
    if fixed:
        release_freed_memory()  # as the loop does, about every second
print(json.dumps({"fixed": fixed, "growth": rss() - start, "row": min(row_bytes)}))
"""


def _tile_rows(*modes: str) -> list[dict]:
    """Run ``_TILE_ROWS`` in one fresh process per mode, side by side (each imports torch through the engine)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    procs = [
        subprocess.Popen([sys.executable, "-c", _TILE_ROWS, m], env=env, stdout=subprocess.PIPE, text=True)
        for m in modes
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(modes)
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def test_bound_heap_growth_returns_freed_tile_arrays_which_glibc_keeps_by_default():
    """densevision.engine.heap: with its thresholds and a release per row, arrays of freed tiles leave the process
    (resident memory grows by well under a row's worth); without (the negative control) a row's worth stays."""
    import platform

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("bound_heap_growth acts on glibc only")
    bounded, default = _tile_rows("bounded", "default")
    assert bounded["fixed"] and not default["fixed"]
    row = bounded["row"]
    assert row > 20 << 20  # each row allocates and frees over 20 MB
    assert bounded["growth"] < row / 4, (bounded, default)
    assert default["growth"] > row / 2, (bounded, default)


# A model's calls as the loop sees them: each takes and frees the same temporaries, one of 48 MB (above glibc's
# largest mmap threshold, 32 MB) and eight of 4 MB, then the loop looks at the heap (HeapWatch.check) or, as before,
# gives freed pages back every time ("every": release_freed_memory). Prints the page faults of the calls after the
# first ("watch", "every"); or ("pinned") the growth of resident memory after freeing arrays pinned by small records,
# less and then more than the watch's RELEASE_GROWTH.
_MODEL_CALLS = """
import json, resource, sys
import numpy as np
import torch
from densevision.engine.heap import RELEASE_GROWTH, HeapWatch, bound_heap_growth, release_freed_memory, resident_bytes

assert bound_heap_growth()
watch = HeapWatch()
check = release_freed_memory if sys.argv[1] == "every" else watch.check
def call():
    big = torch.ones(48 << 20, dtype=torch.uint8)  # torch's arrays: numpy asks for huge pages from 4 MB on
    small = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(8)]
    del big, small
    check()
def pinned(mb):  # 1 MB arrays between small records that stay: freed, their pages stay resident until released
    arrays = []
    for _ in range(mb):
        arrays.append(np.ones(1 << 20, np.uint8))
        kept.append(np.ones(512, np.uint8))
    del arrays
    check()
    return resident_bytes() - base
if sys.argv[1] == "pinned":
    kept, base = [], resident_bytes()
    below = pinned(RELEASE_GROWTH // 2 >> 20)  # under the watch's growth: kept for what comes next
    above = pinned(2 * RELEASE_GROWTH >> 20)  # over it: given back
    print(json.dumps({"below": below, "above": above, "limit": RELEASE_GROWTH}))
else:
    call()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        call()
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def test_the_heap_watch_keeps_a_models_temporaries_and_still_gives_back_what_rows_pin():
    """densevision.engine.heap: a model's reused temporaries (48 MB included) are not faulted in again call after
    call under the watch, where a release after every call faults them in each time (the negative control); rows of
    freed tile arrays pinned by small records still leave the process once they amount to RELEASE_GROWTH."""
    import json
    import platform
    import subprocess
    import sys

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("bound_heap_growth acts on glibc only")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    procs = [
        subprocess.Popen([sys.executable, "-c", _MODEL_CALLS, m], env=env, stdout=subprocess.PIPE, text=True)
        for m in ("watch", "every", "pinned")
    ]
    watched, every, pinned = (json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs)
    page = os.sysconf("SC_PAGE_SIZE")
    assert every["faults"] > 10 * (48 << 20) // page // 2, every  # the control: faulted in again each call
    assert watched["faults"] < every["faults"] / 4, (watched, every)  # 2.1k a call; 2.6k with no release at all
    limit = pinned["limit"]
    assert pinned["below"] > limit / 4, pinned  # half the limit freed, most of it still resident
    assert pinned["above"] < limit / 4, pinned  # twice the limit freed: given back


def test_uint8_tiles_give_the_mmseg_predictor_the_same_logits_to_the_bit():
    # uint8 -> float32 is exact, and mmseg's data_preprocessor converts to float32 before its flip-free
    # normalisation: a uint8 batch (as the readers now hand on) and its float32 copy give identical logits.
    pytest.importorskip("mmseg")
    from densevision.predictors.mmseg import MMSegPredictor

    shrunk = {
        "model.decode_head.num_classes": 3, "model.auxiliary_head.num_classes": 3,
        "model.data_preprocessor.size": None, "model.backbone.embed_dims": 32, "model.backbone.depths": [1, 1, 1, 1],
        "model.backbone.num_heads": [1, 2, 4, 8], "model.decode_head.in_channels": [32, 64, 128, 256],
        "model.decode_head.channels": 32, "model.auxiliary_head.in_channels": 128,
        "model.auxiliary_head.channels": 32,
    }  # fmt: skip
    torch.manual_seed(0)
    predictor = MMSegPredictor.from_config("configs/segmentation/upernet_swin-t_ade20k-512.py", cfg_options=shrunk)
    batch = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    as_uint8, as_float = predictor(batch), predictor(batch.float())
    assert as_uint8.dtype == torch.float32 and as_uint8.shape == (2, 3, 64, 96)
    assert torch.equal(as_uint8, as_float)
    # The preprocessor's own path is unchanged in value: its float32 input equals the uint8 batch converted.
    data = predictor.model.data_preprocessor({"inputs": list(batch[:, [2, 1, 0]])}, False)["inputs"]
    ref = predictor.model.data_preprocessor({"inputs": list(batch[:, [2, 1, 0]].float())}, False)["inputs"]
    assert torch.equal(data, ref)


def test_background_calls_run_in_order_bounded_by_weight_and_raise_the_first_error():
    import threading

    from densevision.engine.runner import BackgroundCalls

    release = threading.Event()
    done: list[int] = []
    most = [0]
    calls = BackgroundCalls(depth=10)

    def work(i: int) -> None:
        release.wait(5)
        most[0] = max(most[0], calls._queued)
        done.append(i)

    calls.submit(work, 0, weight=25)  # heavier than the depth: admitted to the empty queue
    blocked = threading.Thread(target=calls.submit, args=(work, 1), kwargs={"weight": 4})
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # waits while the queue weighs 25
    release.set()
    blocked.join(5)
    for i in range(2, 12):
        calls.submit(work, i, weight=4)
    calls.close()
    assert done == list(range(12)) and most[0] <= 25

    failing = BackgroundCalls()

    def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="first"):  # by the second submit or by close: the first error
        failing.submit(fail, "first")
        failing.submit(fail, "second")  # not run: the first error stops the rest
        failing.close()
