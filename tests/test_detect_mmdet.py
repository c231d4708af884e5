"""A real mmdet DINO (the project's config, a checkpoint the test writes) through detect_objects: per tile it gives
what mmdet's own ``inference_detector`` gives on the same crop, and the merged objects are those crops' detections
merged in image coordinates by a brute-force reference (tests/merge_reference.py, not densevision's merger); with SAM,
each mask is segment_anything's own ``SamPredictor`` mask on the tile that holds the object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from merge_reference import reference as brute_force_merge

from densevision import detect_objects
from densevision.errors import CheckpointError
from densevision.predictors.mmdet import MMDetPredictor
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


# Object rows x0 y0 x1 y1 score label: boxes to 0.01 px, scores to 1e-5 (random weights score about 0.012 to 0.017,
# about 1e-4 apart; GeoJSON rounds them to 6 decimals); batched vs one-by-one inference differs by float noise only.
ROW_TOLERANCE = np.array([0.01, 0.01, 0.01, 0.01, 1e-5, 0.5])


def assert_same_rows(got, want, tol: np.ndarray = ROW_TOLERANCE) -> None:
    """``got`` and ``want`` (``K x C``) hold the same rows in some order, each within ``tol`` (``C``) of its
    partner."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if not len(got):
        return
    d = (np.abs(got[:, None, :] - want[None, :, :]) / tol).max(axis=-1)  # in tolerances
    nearest = d.argmin(axis=1)
    assert sorted(nearest.tolist()) == list(range(len(want))), "rows without a partner"
    assert d.min(axis=1).max() < 1, np.abs(got - want[nearest]).max(axis=0)


def expected_objects(items) -> np.ndarray:
    """The objects (x0 y0 x1 y1 score label) that the brute-force merge (tests/merge_reference.py: all pairs of
    every tile's detections, SAHI's NMM loops, IoS > 0.5, class-aware) makes of mmdet's own per-tile detections."""
    merged = brute_force_merge(TileGrid(*SIZE, TILE, OVERLAP), items, "nmm", "ios", 0.5)
    return np.array([[*box, score, label] for box, score, label, _ in merged.values()]).reshape(-1, 6)


def test_dino_tiles_equal_mmdet_inference_and_merge(reference_run, checkpoint, scene, tmp_path):
    _, items, threshold = reference_run
    want = expected_objects(items)
    assert sum(len(i[1]) for i in items) > len(want) > 0  # random weights, but boxes enough to merge

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
        found[-1].append(f["properties"]["label"])
        assert f["properties"]["class"] == CLASSES[f["properties"]["label"]]
    assert_same_rows(found, want)


def test_checkpoint_of_another_model_is_refused_with_key_names(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=False)
    state["state_dict"].pop("bbox_head.cls_branches.0.bias")
    state["state_dict"]["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(
        CheckpointError, match=r"1 missing keys: bbox_head\.cls_branches\.0\.bias; 1 unexpected keys: extra\.weight;"
    ):
        MMDetPredictor.from_config(CONFIG, bad, cfg_options=OPTIONS)


@pytest.mark.slow
def test_instances_cli_dino_boxes_prompt_sam_vit_b(reference_run, checkpoint, scene, tmp_path):
    """`densevision instances` end to end on the CPU: the DINO checkpoint's boxes prompt SAM ViT-B (official layout,
    written here). Each object's box, score and class are those the brute-force merge makes of mmdet's own per-tile
    predictions; the mask of an object that some grid tile holds clear of its inner sides is segment_anything's own
    ``SamPredictor`` mask for that box on that tile, placed at the tile; every polygon feature covers exactly its
    COCO RLE's pixels, inside the image."""
    import segment_anything
    import shapely
    from pycocotools import mask as mask_utils

    from densevision.cli import main

    sam = tmp_path / "sam_vit_b.pth"
    torch.manual_seed(0)
    sam_model = segment_anything.sam_model_registry["vit_b"]().eval()
    torch.save(sam_model.state_dict(), sam)
    out = tmp_path / "instances.geojson"
    opts = [f"{k}={v}" for k, v in OPTIONS.items()]
    code = main(
        ["instances", str(scene), "-c", str(CONFIG), "-w", str(checkpoint), "--sam", str(sam), "-o", str(out),
         "--tile", str(TILE), "--overlap", str(OVERLAP), "--score-threshold", str(reference_run[2]), "--workers", "0",
         "--coco", str(tmp_path / "coco.json"), "--device", "cpu", "-q", "--native-crs", "--cfg-options", *opts]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "instances.summary.json").read_text())
    assert summary["model"]["masks"] == "sam"
    n = summary["detections"]["objects"]
    assert n > 0 and summary["timings"]["sam_windows"] >= 1
    features = json.loads(out.read_text())["features"]
    results = json.loads((tmp_path / "coco.json").read_text())
    assert len(features) == len(results) == n
    assert all(f["geometry"]["type"] in ("Polygon", "MultiPolygon") for f in features)

    # boxes, scores and classes: the brute-force merge of mmdet's per-tile predictions
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)]).reshape(-1, 4)
    got = np.column_stack([boxes, [r["score"] for r in results], [r["category_id"] for r in results]])
    assert_same_rows(got, expected_objects(reference_run[1]))

    with rasterio.open(scene) as ds:
        rgb = ds.read().transpose(1, 2, 0)
        inverse = ~ds.transform
    H, W = rgb.shape[:2]
    masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in results]  # H x W each, level-0 pixels

    def to_pixels(xy: np.ndarray) -> np.ndarray:  # N x 2 CRS coordinates -> raster pixels
        return np.column_stack(inverse @ (xy[:, 0], xy[:, 1]))

    for k, (f, r, m) in enumerate(zip(features, results, masks, strict=True)):
        assert f["properties"]["score"] == pytest.approx(r["score"], abs=1e-6), k  # feature k is result k
        geom = shapely.transform(shapely.geometry.shape(f["geometry"]), to_pixels)
        assert m.shape == (H, W) and geom.is_valid, k
        assert geom.area == pytest.approx(m.sum(), abs=1e-3), k  # the polygon covers exactly the RLE's pixels
        x0, y0, x1, y1 = geom.bounds if m.any() else (0, 0, W, H)
        assert x0 > -1e-6 and y0 > -1e-6 and x1 < W + 1e-6 and y1 < H + 1e-6, k

    # masks: segment_anything's own predictor on a grid tile that holds the box clear of its inner sides
    # (any such tile: which one the pipeline picks is its own rule; two tiles give different masks for one box)
    predictor = segment_anything.SamPredictor(sam_model)
    held = {k: _tiles_holding(box) for k, box in enumerate(boxes)}
    matched: set[int] = set()
    nontrivial = 0
    for t in TileGrid(*SIZE, TILE, OVERLAP):
        todo = [k for k, tiles in held.items() if t.index in tiles and k not in matched]
        if not todo:
            continue
        predictor.set_image(np.ascontiguousarray(rgb[t.y : t.y + TILE, t.x : t.x + TILE]), image_format="RGB")
        for k in todo:
            ref, _, _ = predictor.predict(box=boxes[k] - [t.x, t.y, t.x, t.y], multimask_output=False)
            expected = np.zeros((H, W), dtype=bool)
            expected[t.y : t.y + TILE, t.x : t.x + TILE] = _without_specks(ref[0])
            if (expected != masks[k]).sum() <= max(4, 0.002 * expected.sum()):  # batched vs one by one: a few px
                matched.add(k)
                nontrivial += 0 < expected.sum() < TILE * TILE
    missed = [k for k, tiles in held.items() if tiles and k not in matched]
    assert not missed, f"objects {missed}: the mask is not SamPredictor's on any tile that holds the box"
    assert nontrivial >= 1, "no object's reference mask is neither empty nor the whole tile"


def _tiles_holding(box: np.ndarray, clear: float = 8.0) -> list[int]:
    """The grid tiles that hold ``box`` at least ``clear`` px from each side that is not the image border (SAM is
    prompted there; a box nearer a tile's inner side gets a window of its own, which this test does not rebuild).
    The scene is two whole tiles side by side."""
    W, H = SIZE
    out = []
    for t in TileGrid(*SIZE, TILE, OVERLAP):
        margin = np.array([box[0] - t.x, box[1] - t.y, t.x + TILE - box[2], t.y + TILE - box[3]])
        inner = np.array([t.x > 0, t.y > 0, t.x + TILE < W, t.y + TILE < H])
        if (margin >= 0).all() and ((margin >= clear) | ~inner).all():
            out.append(t.index)
    return out


def _without_specks(mask: np.ndarray, min_pixels: int = 4) -> np.ndarray:
    """The mask without 4-connected parts of fewer than ``min_pixels`` pixels, the largest part always kept (what
    densevision.stitch.instances documents for its polygons)."""
    from scipy import ndimage

    parts, n = ndimage.label(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    keep = (sizes >= min_pixels) | (np.arange(n) == sizes.argmax())
    return np.isin(parts, np.flatnonzero(keep) + 1)


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


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
@pytest.mark.parametrize("with_masks", [False, True])
def test_one_packed_copy_per_batch_gives_each_tiles_detections(device, with_masks):
    """The batch's detections packed on the device and copied once give, tile by tile, what copying each tile's
    tensors on its own gives (the extraction the predictor did before): same values, dtypes and shapes, also for
    tiles left without detections by the threshold."""
    from mmengine.structures import InstanceData

    from densevision.predictors.mmdet import host_detections

    g = torch.Generator().manual_seed(0)
    batch = []
    for n in (5, 0, 3, 4):  # the second tile has none, the fourth none above the threshold
        p = InstanceData()
        xy = torch.rand(n, 2, generator=g) * 200
        p.bboxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 50], 1).to(device)
        p.scores = (torch.rand(n, generator=g) * (0.25 if n == 4 else 1)).to(device)
        p.labels = torch.randint(0, 80, (n,), generator=g).to(device)
        if with_masks:
            p.masks = (torch.rand(n, 64, 48, generator=g) > 0.5).to(device)
        batch.append(p)
    kept = [p[p.scores >= 0.3] for p in batch]
    got = host_detections(kept, with_masks=with_masks)
    assert [len(d) for d in got] == [len(p) for p in kept] and len(got[1]) == len(got[3]) == 0 < len(got[0])
    for d, p in zip(got, kept, strict=True):
        want = {
            "boxes": p.bboxes.double().cpu().numpy().reshape(-1, 4),
            "scores": p.scores.double().cpu().numpy(),
            "labels": p.labels.cpu().numpy().astype(np.int64),
            "masks": p.masks.bool().cpu().numpy() if with_masks else None,
        }
        for name, w in want.items():
            a = getattr(d, name)
            if w is None:
                assert a is None
                continue
            assert a.dtype == w.dtype and a.shape == w.shape and a.flags.c_contiguous, name
            np.testing.assert_array_equal(a, w)
