"""Kill a run with SIGKILL half way, resume it: the outputs are byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from densevision import segment_image

    class Slow(torch.nn.Module):
        num_classes, class_names = 3, ("a", "b", "c")
        palette, size_divisor, device = ((255, 0, 0), (0, 255, 0), (0, 0, 255)), 16, torch.device("cpu")

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1)
            )

        @torch.no_grad()
        def forward(self, x):
            time.sleep(float(sys.argv[3]))
            return self.net(x / 255.0)

    result = segment_image(sys.argv[1], out=sys.argv[2], predictor=Slow(), tile=64, overlap=16, batch_size=3,
                           blend="gaussian", probability_output=True, workers=int(sys.argv[5]),
                           probability_dtype=sys.argv[6], progress=False, resume=sys.argv[4] == "1")
    print("tiles predicted:", result["timings"].get("tiles", 0))
    """
)


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.tif"
    profile = dict(driver="GTiff", width=400, height=520, count=3, dtype="uint8", crs="EPSG:32631")
    with rasterio.open(path, "w", transform=Affine.translation(0, 5200) @ Affine.scale(10, -10), **profile) as dst:
        dst.write(rng.integers(0, 256, (3, 520, 400), dtype=np.uint8))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    return path, script


def _command(script, src, out, delay, resume, workers=0, probability_dtype="float32"):
    args = (src, out, delay, "1" if resume else "0", workers, probability_dtype)
    return [sys.executable, str(script), *map(str, args)]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _run(*args, **kwargs):
    return subprocess.Popen(_command(*args, **kwargs))


@pytest.mark.parametrize(("workers", "probability_dtype"), [(0, "float32"), (2, "uint8")])
def test_sigkill_then_resume_gives_the_same_bytes(scene, tmp_path, workers, probability_dtype):
    src, script = scene
    reference = tmp_path / "ref" / "seg.tif"
    reference.parent.mkdir()
    settings = dict(workers=workers, probability_dtype=probability_dtype)
    assert _run(script, src, reference, 0, False, **settings).wait(timeout=300) == 0

    out = tmp_path / "run" / "seg.tif"
    out.parent.mkdir()
    work = out.with_name("seg.tif.partial.d")
    proc = _run(script, src, out, 0.15, False, **settings)
    deadline = time.time() + 240
    while len(list(work.glob("blocks-*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    helpers = _children(proc.pid)  # the process writing the outputs (and the reader workers)
    assert helpers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 20  # the writer dies at once with its parent; reader workers notice within seconds
    while any(map(_alive, helpers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, helpers))
    done = len(list(work.glob("blocks-*.npz")))
    assert 3 <= done < 10  # 10 block rows in all: killed half way
    assert not out.exists() and not out.with_name("seg.summary.json").exists()

    # Starting again without --resume refuses rather than throwing the finished rows away.
    again = subprocess.run(
        _command(script, src, out, 0, False, **settings), capture_output=True, text=True, timeout=300
    )
    assert again.returncode != 0 and "ConfigError" in again.stderr and "pass --resume" in again.stderr
    assert len(list(work.glob("blocks-*.npz"))) == done

    assert _run(script, src, out, 0, True, **settings).wait(timeout=300) == 0
    assert not work.exists()
    for name in ("seg.tif", "seg.probs.tif"):
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name


def test_resume_refuses_other_settings_and_foreign_folders(tmp_path):
    from densevision.engine.workdir import BlockFolder
    from densevision.errors import ConfigError

    root = tmp_path / "seg.tif.partial.d"
    layout = {"rows": [0, 4], "cols": [0, 8]}
    store = BlockFolder(root, {"tile": 512, "blend": "gaussian"}, resume=False, **layout)
    store.put(0, 0, np.zeros((4, 8), np.uint8), None)
    assert BlockFolder(root, {"tile": 512, "blend": "gaussian"}, resume=True, **layout).done() == 1
    with pytest.raises(ConfigError, match="pass --resume"):
        BlockFolder(root, {"tile": 512, "blend": "gaussian"}, resume=False, **layout)
    with pytest.raises(ConfigError, match="other blend, tile"):
        BlockFolder(root, {"tile": 256, "blend": "crop"}, resume=True, **layout)
    (root / "run.json").unlink()
    with pytest.raises(ConfigError, match="not a densevision work folder"):
        BlockFolder(root, {"tile": 512}, resume=True, **layout)


def test_block_folder_commits_a_block_row_when_its_last_block_is_in_and_reads_column_strips(tmp_path):
    from densevision.engine.workdir import BlockFolder
    from densevision.errors import InvalidRegionError

    rows, cols = [0, 5, 12, 13], [0, 4, 9, 16]
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 5, (13, 16), dtype=np.uint8)
    probs = rng.random((3, 13, 16), dtype=np.float32)  # band-sequential
    store = BlockFolder(tmp_path / "w", {}, resume=False, rows=rows, cols=cols)
    blocks = [(k, c) for k in range(3) for c in range(3)]
    for n, i in enumerate([2, 0, 1, 4, 5, 3]):  # block rows 0 and 1, blocks in any order within a row
        (k, c) = blocks[i]
        window = np.s_[rows[k] : rows[k + 1], cols[c] : cols[c + 1]]
        store.put(rows[k], cols[c], classes[window], probs[(slice(None), *window)])
        assert store.done() == (n + 1) // 3  # committed only once its last block is in
        assert len(list((tmp_path / "w").glob("blocks-*.npz"))) == store.done()
        assert len(list((tmp_path / "w").glob("probs-*.npy"))) == store.done()
    with pytest.raises(InvalidRegionError, match="put twice"):
        store.put(5, 4, classes[5:12, 4:9], probs[:, 5:12, 4:9])
    with pytest.raises(InvalidRegionError, match="not the corner of a block"):
        store.put(12, 3, classes[12:, 3:9])
    with pytest.raises(InvalidRegionError, match="block \\(2, 0\\) is 4 x 1 pixels"):
        store.put(12, 0, classes[12:, :5])
    with pytest.raises(InvalidRegionError, match=r"block \(2, 0\) is 4 x 1 pixels.*C x h x w"):
        store.put(12, 0, classes[12:, :4], probs[:, 12:, :4].transpose(1, 2, 0))  # h x w x C: refused
    store.put(12, 0, classes[12:, :4], probs[:, 12:, :4])
    with pytest.raises(InvalidRegionError, match="probabilities for every block or none"):
        store.put(12, 4, classes[12:, 4:9])
    store.close()  # an interrupted block row: not committed, redone on resume
    assert (tmp_path / "w" / "probs-000002.npy.partial").is_file()
    assert not (tmp_path / "w" / "probs-000002.npy").exists()
    store = BlockFolder(tmp_path / "w", {}, resume=True, rows=rows, cols=cols)
    assert store.done() == 2 and store.done(1) == 1 and store.done(2) == 0
    for c in reversed(range(3)):
        store.put(12, cols[c], classes[12:, cols[c] : cols[c + 1]], probs[:, 12:, cols[c] : cols[c + 1]])
    assert store.done() == 3
    got = list(store.blocks((1, 3)))  # block columns 1 and 2, row by row
    assert [(y, x) for y, x, *_ in got] == [(0, 4), (0, 9), (5, 4), (5, 9), (12, 4), (12, 9)]
    for y, x, cm, p in got:
        h, w = cm.shape
        np.testing.assert_array_equal(cm, classes[y : y + h, x : x + w])
        np.testing.assert_array_equal(p, probs[:, y : y + h, x : x + w])
    # A row's probabilities are one .npy that numpy reads on its own: the blocks one after the other.
    row = np.load(tmp_path / "w" / "probs-000001.npy")
    assert row.dtype == np.float32 and row.size == 3 * 7 * 16
    np.testing.assert_array_equal(row[: 3 * 7 * 4].reshape(3, 7, 4), probs[:, 5:12, :4])
    store.remove()
    assert not (tmp_path / "w").exists()


def test_a_work_folder_of_another_layout_is_not_resumed(tmp_path):
    from densevision.engine.workdir import BlockFolder
    from densevision.errors import ConfigError

    layout = {"rows": [0, 5], "cols": [0, 4]}
    BlockFolder(tmp_path / "w", {"blend": "crop"}, resume=False, **layout)
    run = tmp_path / "w" / "run.json"
    meta = json.loads(run.read_text())
    assert meta["work_layout"] == BlockFolder.layout
    run.write_text(json.dumps({**meta, "work_layout": "npz blocks, h x w x C probabilities"}))  # an older release's
    with pytest.raises(ConfigError, match="started with other work_layout"):
        BlockFolder(tmp_path / "w", {"blend": "crop"}, resume=True, **layout)


class _Conv(torch.nn.Module):
    """A small fixed convolution (3 classes); ``fail_after`` batches, it raises, as a crash would stop the run."""

    num_classes, class_names = 3, ("a", "b", "c")
    palette, size_divisor, device = ((255, 0, 0), (0, 255, 0), (0, 0, 255)), 16, torch.device("cpu")

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 3, 5, padding=2)
        self.fail_after, self.calls = fail_after, 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.net(x / 255.0)


@pytest.mark.parametrize("blend", ["crop", "gaussian"])
def test_resume_after_a_crash_anywhere_gives_the_same_bytes(tmp_path, blend):
    # 333 x 250 with tile 64, overlap 16: the last tile row and column are shifted inward, so the last two tile rows
    # are fed column by column (stitch_order) and two block rows are open at once near the end.
    rng = np.random.default_rng(1)
    src = tmp_path / "scene.tif"
    profile = dict(driver="GTiff", width=333, height=250, count=3, dtype="uint8", crs="EPSG:32631")
    with rasterio.open(src, "w", transform=Affine.translation(0, 2500) @ Affine.scale(10, -10), **profile) as dst:
        dst.write(rng.integers(0, 256, (3, 250, 333), dtype=np.uint8))
    kw = dict(tile=64, overlap=16, batch_size=3, blend=blend, probability_output=True, workers=0, progress=False)

    from densevision import segment_image
    from densevision.stitch.segmentation import stitch_order
    from densevision.tiling import TileGrid

    assert stitch_order(TileGrid(333, 250, 64, 16)) != list(TileGrid(333, 250, 64, 16))
    (tmp_path / "ref").mkdir()
    segment_image(src, out=tmp_path / "ref" / "seg.tif", predictor=_Conv(), **kw)
    batches = -(-len(TileGrid(333, 250, 64, 16)) // 3)  # 35 tiles, 12 batches
    for crash in (4, 7, batches - 1):  # after block row 0, in the middle, in the interleaved last two rows
        out = tmp_path / f"run{crash}" / "seg.tif"
        out.parent.mkdir()
        with pytest.raises(RuntimeError, match="simulated crash"):
            segment_image(src, out=out, predictor=_Conv(fail_after=crash), **kw)
        assert not out.exists()
        summary = segment_image(src, out=out, predictor=_Conv(), resume=True, **kw)
        assert 1 <= summary["resumed"]["rows_already_done"] < summary["resumed"]["rows"] == 5
        if crash > 4:  # only tile rows reaching into unfinished block rows are redone (after row 0: all)
            assert summary["timings"]["tiles"] < len(TileGrid(333, 250, 64, 16))
        for name in ("seg.tif", "seg.probs.tif"):
            assert (out.parent / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (crash, name)
