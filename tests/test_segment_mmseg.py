"""A real mmsegmentation model (UperNet + Swin-T from configs/) through densevision, against mmseg's own slide
inference, with a checkpoint written in mmengine's layout (numpy metadata included)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from densevision import segment_image
from densevision.cli import main

REPO_CONFIG = "configs/segmentation/upernet_swin-t_ade20k-512.py"
CLASSES = ("background", "tumor", "stroma", "necrosis", "fat")
SMALL = {
    "model.decode_head.num_classes": len(CLASSES),
    "model.auxiliary_head.num_classes": len(CLASSES),
    "model.data_preprocessor.size": None,
    "model.test_cfg.crop_size": (128, 128),
    "model.test_cfg.stride": (96, 96),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights saved as mmengine's Runner saves them: state_dict + meta with dataset_meta and numpy."""
    from mmengine.config import Config
    from mmengine.runner.checkpoint import save_checkpoint
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(REPO_CONFIG)
    cfg.merge_from_dict(SMALL)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    meta = {
        "dataset_meta": {
            "classes": CLASSES,
            "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
        },
        "seed": np.int64(0),
        "epoch": 1,
        "iter": np.int64(10),
    }
    path = tmp_path_factory.mktemp("ckpt") / "upernet_swin-t.pth"
    save_checkpoint({"state_dict": model.state_dict(), "meta": meta}, str(path))
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, 220, 300), dtype=np.uint8)
    data[:, 60:160, 80:220] = np.array([200, 60, 120], dtype=np.uint8)[:, None, None]  # a structured region
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=300, height=220, count=3, dtype="uint8", crs="EPSG:32633",
        transform=Affine.translation(600000, 5000000) @ Affine.scale(0.5, -0.5),
    ) as dst:  # fmt: skip
        dst.write(data)
    return path, data


def test_constant_blend_equals_mmseg_slide_inference(checkpoint, scene, tmp_path):
    from mmseg.apis import init_model

    from densevision.compat import patch_mmengine

    path, data = scene
    patch_mmengine()
    model = init_model(REPO_CONFIG, str(checkpoint), device="cpu", cfg_options=SMALL)
    bgr = torch.from_numpy(np.ascontiguousarray(data[::-1])).float()  # what mmseg's cv2 loader would give
    inputs = model.data_preprocessor({"inputs": [bgr]}, False)["inputs"]
    meta = {"img_shape": (220, 300), "ori_shape": (220, 300), "pad_shape": (220, 300)}
    with torch.no_grad():
        reference = torch.softmax(model.slide_inference(inputs, [meta])[0], dim=0).numpy()

    summary = segment_image(
        path, REPO_CONFIG, checkpoint, out=tmp_path / "seg.tif", tile=128, overlap=32, blend="constant",
        probability_output=True, skip_empty=False, workers=0, cfg_options=SMALL, progress=False,
    )  # fmt: skip
    with rasterio.open(summary["probabilities"]) as probs:
        ours = probs.read()
    assert np.abs(ours - reference).max() <= 1e-4
    assert summary["model"]["classes"] == list(CLASSES)  # from the checkpoint's dataset_meta
    with rasterio.open(tmp_path / "seg.tif") as seg:
        np.testing.assert_array_equal(seg.read(1), reference.argmax(0))
        assert seg.crs.to_epsg() == 32633


def test_cli_segment(checkpoint, scene, tmp_path, capsys):
    path, _ = scene
    out = tmp_path / "cli.tif"
    args = ["segment", str(path), "-c", REPO_CONFIG, "-w", str(checkpoint), "-o", str(out), "--tile", "128"]
    args += ["--overlap", "32", "--workers", "0", "-q", "--cfg-options"]
    args += [f"{k}={v}".replace(" ", "") for k, v in SMALL.items()]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "tiles: 6 done" in printed
    assert out.exists() and (tmp_path / "cli.summary.json").exists() and (tmp_path / "cli.preview.png").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-c", "nope.py"], "neither a file nor a shipped config name"),
        (["-c", REPO_CONFIG, "-w", "nope.pth"], "no such checkpoint"),
    ],
)
def test_cli_segment_bad_model_files(scene, tmp_path, extra, message):
    path, _ = scene
    proc = subprocess.run(
        [sys.executable, "-m", "densevision.cli", "segment", str(path), "-o", str(tmp_path / "o.tif"), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bgr_to_rgb", [True, False])
def test_the_one_step_input_is_the_data_preprocessors_to_the_bit(checkpoint, bgr_to_rgb):
    from densevision.predictors.mmseg import MMSegPredictor

    options = SMALL | {"model.data_preprocessor.bgr_to_rgb": bgr_to_rgb}
    predictor = MMSegPredictor.from_config(REPO_CONFIG, checkpoint, cfg_options=options)
    rgb = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, 64, 96), dtype=np.uint8))
    pre = predictor.model.data_preprocessor
    assert pre.channel_conversion == bgr_to_rgb
    # What mmseg's own loader gives (BGR, from cv2), through the preprocessor image by image.
    expected = pre({"inputs": list(rgb[:, [2, 1, 0]])}, False)["inputs"]
    for batch in (rgb, rgb.float()):
        got = predictor.model_input(batch)
        assert got.dtype == torch.float32 and got.numpy().tobytes() == expected.numpy().tobytes()
