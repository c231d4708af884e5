"""The benchmark driver end to end at --quick sizes: every part runs and lands in the report with its headline."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick_writes_every_part(tmp_path: Path) -> None:
    parts = ["memory", "overhead", "mmseg", "seams", "gpu"]
    if importlib.util.find_spec("sahi") is not None:  # the bench extra
        parts += ["sahi", "truth"]
    out = tmp_path / "BENCHMARKS.md"
    # An earlier report with a hand-written record below it: the report is replaced, the record kept.
    marker = next(line for line in (REPO / "benchmarks" / "BENCHMARKS.md").read_text().splitlines() if "<!--" in line)
    record = f"{marker}\n\n## A measurement by hand\n\n    its command\n\nkept: 1.23 s\n"
    out.write_text(f"# Benchmarks\n\n## Headlines\n\n- an old headline\n\n{record}")
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--workdir", str(tmp_path / "work")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([*cmd, "--out", str(out), "--parts", *parts], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text.endswith("\n" + record) and text.count(marker) == 1 and "an old headline" not in text
    assert not out.with_name(out.name + ".partial").exists()
    assert "Quick run" in text and "## Headlines" in text
    headlines = text.split("## Headlines", 1)[1].split("\n## ", 1)[0]
    for lead in ("Memory: ", "Engine overhead", "Against mmseg", "Seams ", "GPU (cpu)"):
        assert lead in headlines, lead
    if "sahi" in parts:
        assert "Against SAHI" in headlines and "Planted objects" in headlines
    assert "largest probability difference" in headlines
    # mmseg's slide inference and segment_image agree to float precision, also at these sizes
    diff = float(headlines.split("largest probability difference ")[1].split(".\n")[0].rstrip("."))
    assert diff < 1e-4


def test_run_all_without_sahi_says_how_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("sahi") is not None:
        pytest.skip("sahi is installed")
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--parts", "sahi"]
    run = subprocess.run([*cmd, "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "pip install -e '.[bench]'" in run.stdout


def test_seam_reference_is_whole_image_inference_at_the_image_resolution(tmp_path: Path) -> None:
    """The seam benchmark's reference must not go through the config's test pipeline, which resizes the image to a
    512-px short side first (that once made the reference a prediction of a rescaled image)."""
    import cv2
    import numpy as np
    import torch
    from mmseg.apis import init_model
    from mmseg.structures import SegDataSample

    sys.path.insert(0, str(REPO / "benchmarks"))
    import seam_bench

    config = tmp_path / "small.py"
    config.write_text(
        f"_base_ = [{str(seam_bench.CONFIG)!r}]\n"
        "model = dict(decode_head=dict(channels=16, num_classes=3), auxiliary_head=dict(channels=8, num_classes=3))\n"
    )
    torch.manual_seed(0)
    model = init_model(str(config), None, device="cpu")
    model.init_weights()
    checkpoint = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, checkpoint)
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    cv2.imwrite(str(image), pixels)

    whole, _ = seam_bench.mmseg_prediction(str(config), str(checkpoint), image, "cpu")

    model.eval()
    metas = [{"img_shape": (96, 160), "ori_shape": (96, 160)}]
    data = model.data_preprocessor(
        {"inputs": [torch.from_numpy(pixels).permute(2, 0, 1)], "data_samples": [SegDataSample(metainfo=metas[0])]}
    )
    with torch.no_grad():
        expected = model.encode_decode(data["inputs"], metas).argmax(1)[0].numpy()
    assert whole.shape == (96, 160)
    np.testing.assert_array_equal(whole, expected)
