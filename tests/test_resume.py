"""Kill a run with SIGKILL half way, resume it: the outputs are byte-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import rasterio
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
                           blend="gaussian", probability_output=True, workers=0, progress=False,
                           resume=sys.argv[4] == "1")
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


def _run(script, src, out, delay, resume):
    return subprocess.Popen([sys.executable, str(script), str(src), str(out), str(delay), "1" if resume else "0"])


def test_sigkill_then_resume_gives_the_same_bytes(scene, tmp_path):
    src, script = scene
    reference = tmp_path / "ref" / "seg.tif"
    reference.parent.mkdir()
    assert _run(script, src, reference, 0, False).wait(timeout=300) == 0

    out = tmp_path / "run" / "seg.tif"
    out.parent.mkdir()
    work = out.with_name("seg.tif.partial.d")
    proc = _run(script, src, out, 0.15, False)
    deadline = time.time() + 240
    while len(list(work.glob("band-*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(list(work.glob("band-*.npz")))
    assert 3 <= done < 10  # 10 bands in all: killed half way
    assert not out.exists() and not out.with_name("seg.summary.json").exists()

    # Starting again without --resume refuses rather than throwing the finished bands away.
    again = subprocess.run(
        [sys.executable, str(script), str(src), str(out), "0", "0"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode != 0 and "ConfigError" in again.stderr and "pass --resume" in again.stderr
    assert len(list(work.glob("band-*.npz"))) == done

    assert _run(script, src, out, 0, True).wait(timeout=300) == 0
    assert not work.exists()
    for name in ("seg.tif", "seg.probs.tif"):
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name


def test_resume_refuses_other_settings_and_foreign_folders(tmp_path):
    from densevision.engine.workdir import BandStore
    from densevision.errors import ConfigError

    root = tmp_path / "seg.tif.partial.d"
    store = BandStore(root, {"tile": 512, "blend": "gaussian"}, resume=False)
    store.put(0, 0, np.zeros((4, 8), np.uint8), None)
    assert BandStore(root, {"tile": 512, "blend": "gaussian"}, resume=True).done() == 1
    with pytest.raises(ConfigError, match="other blend, tile"):
        BandStore(root, {"tile": 256, "blend": "crop"}, resume=True)
    (root / "run.json").unlink()
    with pytest.raises(ConfigError, match="not a densevision work folder"):
        BandStore(root, {"tile": 512}, resume=True)
