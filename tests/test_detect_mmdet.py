"""A real mmdet DINO (the project's config, a checkpoint the test writes) through detect_objects: per tile it gives
what mmdet's own ``inference_detector`` gives on the same crop, and the merged objects are those crops' detections
merged in image coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from densevision import detect_objects
from densevision.errors import CheckpointError
from densevision.predictors.mmdet import MMDetPredictor
from densevision.stitch import merge_detections
from densevision.synthetic.rasters import make_geotiff
from densevision.tiling import TileGrid

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection" / "dino_swin-t_fpn_coco.py"
CLASSES = ("ship", "tank")
SIZE = (400, 256)  # two 256-px tiles side by side, overlapping by 112 px
TILE, OVERLAP = 256, 112
# Few queries keep the CPU time down; the architecture is the config's.
OPTIONS = {"model.num_queries": 100, "model.bbox_head.num_classes": len(CLASSES), "model.test_cfg.max_per_img": 100}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A DINO checkpoint in mmengine's layout (state_dict + meta with dataset_meta and numpy values)."""
    from mmdet.apis import init_detector
    from mmengine.config import Config

    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(OPTIONS)
    torch.manual_seed(0)
    model = init_detector(cfg, None, device="cpu")
    model.init_weights()  # init_detector leaves some tensors (e.g. the level embeddings) as uninitialised memory
    path = tmp_path_factory.mktemp("dino") / "dino.pth"
    meta = {"dataset_meta": {"classes": CLASSES, "palette": [(255, 0, 0), (0, 0, 255)]}, "seed": np.int64(0)}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def scene(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("dino-scene") / "scene.tif"
    make_geotiff(path, *SIZE, seed=5)
    return path


def reference(checkpoint: Path, scene: Path, threshold: float = 0.0) -> tuple[TileGrid, list]:
    """mmdet's own inference on each tile's crop (no resize), shifted to image coordinates."""
    from mmcv.transforms import Compose
    from mmdet.apis import inference_detector, init_detector
    from mmengine.config import Config

    from densevision.compat import patch_mmengine

    patch_mmengine()
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(OPTIONS)
    model = init_detector(cfg, str(checkpoint), device="cpu")
    pipeline = Compose(
        [
            dict(type="mmdet.LoadImageFromNDArray"),
            dict(type="mmdet.Resize", scale=(TILE, TILE), keep_ratio=False),  # a no-op that records scale 1
            dict(type="mmdet.PackDetInputs", meta_keys=("img_id", "ori_shape", "img_shape", "scale_factor")),
        ]
    )
    with rasterio.open(scene) as ds:
        rgb = ds.read().transpose(1, 2, 0)
    grid = TileGrid(*SIZE, TILE, OVERLAP)
    items = []
    for t in grid:
        crop = np.ascontiguousarray(rgb[t.y : t.y + TILE, t.x : t.x + TILE, ::-1])  # BGR, as mmcv loads
        p = inference_detector(model, crop, test_pipeline=pipeline).pred_instances
        keep = (p.scores >= threshold).numpy()
        boxes = p.bboxes.numpy()[keep] + [t.x, t.y, t.x, t.y]
        items.append((t, boxes, p.scores.numpy()[keep], p.labels.numpy()[keep]))
    return grid, items


@pytest.fixture(scope="module")
def reference_run(checkpoint, scene) -> tuple[TileGrid, list, float]:
    """The reference detections above a threshold that keeps about the top fifth of them. Random weights score near
    a constant whose value depends on the init; the threshold sits in the widest gap between scores there, so that
    float noise cannot move a box across it."""
    grid, items = reference(checkpoint, scene)
    scores = np.sort(np.concatenate([i[2] for i in items]))
    k = np.arange(int(0.75 * len(scores)), int(0.85 * len(scores)))
    best = k[np.argmax(scores[k + 1] - scores[k])]
    threshold = float((scores[best] + scores[best + 1]) / 2)
    return grid, [(t, b[s >= threshold], s[s >= threshold], lb[s >= threshold]) for t, b, s, lb in items], threshold


def test_dino_tiles_equal_mmdet_inference_and_merge(reference_run, checkpoint, scene, tmp_path):
    grid, items, threshold = reference_run
    expected = merge_detections(grid, items, method="nmm", match="ios", threshold=0.5)
    assert sum(len(i[1]) for i in items) > len(expected) > 0  # random weights, but boxes enough to merge

    out = tmp_path / "dino.geojson"
    summary = detect_objects(
        scene, CONFIG, checkpoint, out=out, cfg_options=OPTIONS, tile=TILE, overlap=OVERLAP, batch_size=2,
        score_threshold=threshold, workers=0, native_crs=True, device="cpu", progress=False,
    )  # fmt: skip
    assert summary["model"]["classes"] == list(CLASSES)
    assert summary["detections"]["raw"] == sum(len(i[1]) for i in items)
    with rasterio.open(scene) as ds:
        inverse = ~ds.transform
    features = json.loads(out.read_text())["features"]
    found = []
    for f in features:
        ring = np.array(f["geometry"]["coordinates"][0])
        cols, rows = inverse @ (ring[:, 0], ring[:, 1])
        found.append([cols.min(), rows.min(), cols.max(), rows.max(), f["properties"]["score"]])
    want = np.column_stack([expected.boxes, expected.scores])
    found_sorted = np.array(sorted(map(tuple, np.round(found, 2))))
    want_sorted = np.array(sorted(map(tuple, np.round(want, 2))))
    assert found_sorted.shape == want_sorted.shape
    assert np.abs(found_sorted - want_sorted).max() < 0.05  # batched vs one-by-one float noise only
    assert {f["properties"]["class"] for f in features} <= set(CLASSES)


def test_checkpoint_of_another_model_is_refused_with_key_names(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=False)
    state["state_dict"].pop("bbox_head.cls_branches.0.bias")
    state["state_dict"]["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"1 missing \(bbox_head\.cls_branches\.0\.bias\).*extra\.weight"):
        MMDetPredictor.from_config(CONFIG, bad, cfg_options=OPTIONS)


@pytest.mark.slow
def test_instances_cli_dino_boxes_prompt_sam_vit_b(reference_run, checkpoint, scene, tmp_path):
    """`densevision instances` end to end on the CPU: the DINO checkpoint's boxes prompt SAM ViT-B (official layout,
    written here); every object becomes one polygon feature, and the COCO results carry its RLE."""
    import segment_anything

    from densevision.cli import main

    sam = tmp_path / "sam_vit_b.pth"
    torch.manual_seed(0)
    torch.save(segment_anything.sam_model_registry["vit_b"]().state_dict(), sam)
    out = tmp_path / "instances.geojson"
    opts = [f"{k}={v}" for k, v in OPTIONS.items()]
    code = main(
        ["instances", str(scene), "-c", str(CONFIG), "-w", str(checkpoint), "--sam", str(sam), "-o", str(out),
         "--tile", str(TILE), "--overlap", str(OVERLAP), "--score-threshold", str(reference_run[2]), "--workers", "0",
         "--coco", str(tmp_path / "coco.json"), "--device", "cpu", "-q", "--cfg-options", *opts]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "instances.summary.json").read_text())
    assert summary["model"]["masks"] == "sam"
    n = summary["detections"]["objects"]
    assert n > 0 and summary["timings"]["sam_windows"] >= 1
    features = json.loads(out.read_text())["features"]
    assert len(features) == n
    assert all(f["geometry"]["type"] in ("Polygon", "MultiPolygon") for f in features)
    assert len(json.loads((tmp_path / "coco.json").read_text())) == n


def test_without_a_checkpoint_the_weights_are_the_configs_initialisation():
    """init_detector leaves some tensors (DINO's level embeddings) as uninitialised memory: garbage, sometimes NaN.
    Without a checkpoint the predictor initialises the model as training would, so a seed decides the weights."""
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        states.append(MMDetPredictor.from_config(CONFIG, None, cfg_options=OPTIONS).model.state_dict())
    for k, v in states[0].items():
        assert torch.isfinite(v.float()).all(), k
        torch.testing.assert_close(states[1][k], v, msg=k)
    assert states[0]["level_embed"].std() > 0.5  # normal_() in init_weights; otherwise whatever memory held
