"""The whole-image job as users meet it: models built from a config that holds only ``model`` and its classes, the
settings' checks before anything is written, output folders created, and a quiet terminal (the libraries' output in
the log file; an unexpected error is one line naming that file)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densevision.cli import main
from densevision.configs import find_config


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "tissue.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (72, 100, 3), dtype=np.uint8)).save(path)
    return path


def _model_only(tmp_path: Path, base: str, classes: tuple[str, ...], heads: tuple[str, ...]) -> Path:
    """A config file holding only the ``model`` of a shipped config (its heads set to ``classes``) and ``metainfo``:
    no ``_base_``, no data loaders."""
    from mmengine.config import Config

    model = Config.fromfile(find_config(base)).model
    for head in heads:
        model[head]["num_classes"] = len(classes)
    path = tmp_path / "model_only.py"
    Config({"model": model.to_dict(), "metainfo": {"classes": classes}}).dump(path)
    assert "dataloader" not in path.read_text() and "_base_" not in path.read_text()
    return path


def test_a_config_with_only_a_model_and_its_classes_segments(image, tmp_path, capsys):
    classes = ("background", "tumour", "stroma")
    config = _model_only(tmp_path, "demo/upernet_swin-tiny_demo-256", classes, ("decode_head", "auxiliary_head"))
    out = tmp_path / "new" / "folder" / "seg.tif"  # missing folders are created
    code = main(["segment", str(image), "-c", str(config), "-o", str(out), "--tile", "64", "--overlap", "16", "-q"])
    assert code == 0
    summary = json.loads(out.with_name("seg.summary.json").read_text())
    assert summary["model"]["classes"] == list(classes)
    assert sum(c["pixels"] for c in summary["classes"]) + summary["nodata_pixels"] == 100 * 72
    # Only densevision's own lines on the terminal.
    said = capsys.readouterr()
    assert [ln.split(":")[0] for ln in said.out.splitlines()] == ["segmentation", "preview", "tiles", "summary"]
    assert said.err == ""


def test_a_config_with_only_a_model_and_its_classes_detects(image, tmp_path):
    classes = ("ship", "car")
    config = _model_only(tmp_path, "demo/dino_swin-tiny_demo-256", classes, ("bbox_head",))
    out = tmp_path / "det.geojson"
    assert (
        main(["detect", str(image), "-c", str(config), "-o", str(out), "--tile", "128", "--overlap", "16", "-q"]) == 0
    )
    summary = json.loads(out.with_name("det.summary.json").read_text())
    assert [c["name"] for c in summary["classes"]] == list(classes)
    # Negative control: mmdet's own builder stops on this config (it wants model.backbone's init and test data).
    from mmdet.apis import init_detector

    with pytest.raises(Exception, match="test_dataloader"):
        init_detector(str(config), None, device="cpu")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--batch-size", "0"], "batch size (--batch-size) must be a whole number > 0, got 0"),
        (["--tile", "64", "--overlap", "64"], "overlap 64 must be smaller than the tile size 64"),
        (["--workers", "-1"], "reader workers (--workers) must be a whole number >= 0, got -1"),
        (["--value-range", "5", "5"], "value range must be two finite numbers LO < HI"),
    ],
)
def test_numeric_settings_are_checked_before_anything_is_written(image, tmp_path, capsys, flags, says):
    out = tmp_path / "o.tif"
    assert main(["segment", str(image), "-c", "upernet_swin-t_ade20k-512", "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert list(tmp_path.iterdir()) == []


def test_keyword_settings_reach_their_group_and_unknown_ones_are_refused(image, tmp_path):
    from densevision.apis.settings import SEGMENTATION_TILING, Reading, Tiling, gather

    options = {"tile": 256, "mpp": 0.5, "bands": [3, 2, 1], "blend": "crop"}
    assert gather(None, SEGMENTATION_TILING, options) == Tiling(256, 64, 4)
    assert gather(Reading(workers=0), Reading(), options) == Reading(mpp=0.5, bands=(3, 2, 1), workers=0)
    assert options == {"blend": "crop"}  # left for the task's group
    from densevision import segment_image

    with pytest.raises(TypeError, match="unexpected keyword arguments: tiel"):
        segment_image(image, "upernet_swin-t_ade20k-512", out=tmp_path / "o.tif", tiel=256)


def test_an_unexpected_error_is_one_line_naming_the_log_file(image, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        print("mmengine - INFO - a library line")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        raise RuntimeError("something broke")

    monkeypatch.setattr("densevision.apis.segment.segment_image", broken)
    out = tmp_path / "seg.tif"
    argv = ["segment", str(image), "-c", "upernet_swin-t_ade20k-512", "-o", str(out)]
    assert main(argv) == 1
    said = capsys.readouterr()
    log = tmp_path / "seg.log"
    assert said.out == ""
    assert said.err.splitlines() == [
        f"densevision: internal error: RuntimeError: something broke (the traceback is in {log})"
    ]
    text = log.read_text()
    assert "a library line" in text and "a library warning" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: something broke" in text
    # -v (before or after the command) shows it all on the terminal too.
    assert main([*argv, "-v"]) == 1
    said = capsys.readouterr()
    assert "a library line" in said.out and "Traceback (most recent call last)" in said.out
    assert "a library warning" in said.err


def test_the_segment_command_under_torchrun_equals_one_process(image, tmp_path):
    """As the README writes it: ``torchrun --nproc_per_node 2 -m densevision.cli segment ...``. Rank 1 used to stop
    with a KeyError reading a summary that only rank 0 has, and torchrun then stopped rank 0."""
    import subprocess
    import sys

    import torch

    from densevision.predictors.mmseg import MMSegPredictor

    classes = ("background", "tumour", "stroma")
    config = _model_only(tmp_path, "demo/upernet_swin-tiny_demo-256", classes, ("decode_head", "auxiliary_head"))
    model = MMSegPredictor.from_config(config).model  # random weights, saved in mmengine's layout: both runs load them
    checkpoint = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": classes}}}, checkpoint)
    args = ["segment", str(image), "-c", str(config), "-w", str(checkpoint), "--tile", "64", "--overlap", "16", "-q"]
    one, two = tmp_path / "one" / "seg.tif", tmp_path / "two" / "seg.tif"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (torchrun sets OMP_NUM_THREADS=1): a model's floats depend on it
    try:
        assert main([*args, "-o", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "densevision.cli", *args, "-o", str(two)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
    assert proc.stdout.count("segmentation: ") == 1  # rank 0 reports; rank 1 is quiet
    assert two.read_bytes() == one.read_bytes()
    assert json.loads(two.with_name("seg.summary.json").read_text())["settings"]["world_size"] == 2
