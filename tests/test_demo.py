"""`densevision demo`: training datasets cut from generated images match the planted objects, the scores are right on
known answers, an end-to-end run at the tiny size writes every promised file, a second run takes the models from the
cache, and missing sample data gives one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from densevision.cli import main
from densevision.demo.run import PRESETS
from densevision.demo.score import detection_scores, segmentation_scores
from densevision.synthetic.crop_datasets import crop_origins, write_ade_crops, write_coco_crops
from densevision.synthetic.planted import Planted
from densevision.synthetic.scenes import SceneSpec, build, class_names, find_sources, read_truth
from densevision.training.checks import check_coco, check_segmentation, read_class_file

CROP = 128


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    spec = SceneSpec("slide", 640, 576, 12, (24, 64), seed=5)
    path = tmp_path_factory.mktemp("slide") / "slide.tiff"
    return path, build(spec, path, find_sources())  # the shipped samples


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    spec = SceneSpec("geotiff", 608, 544, 20, (16, 48), seed=6, collar=16)
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    return path, build(spec, path, find_sources())


def test_crop_origins_cover_and_split():
    origins = crop_origins(600, 520, 128, 100, val_fraction=0.25)
    assert origins["train"][0] == (0, 0) and (472, 0) in origins["train"]  # the last column ends at the border
    split_y = 520 - 130
    assert all(y + 128 <= split_y for _, y in origins["train"]) and all(y >= split_y for _, y in origins["val"])
    assert {y for _, y in origins["val"]} == {390, 392}  # the grid, and one crop ending at the border


def test_a_data_folder_gives_the_same_scene_as_the_shipped_samples(data_dir, scene, tmp_path):
    path, objects = scene
    again = tmp_path / "scene.tif"
    assert (
        build(SceneSpec("geotiff", 608, 544, 20, (16, 48), seed=6, collar=16), again, find_sources(data_dir)) == objects
    )
    assert again.read_bytes() == path.read_bytes()


def test_planted_classes_follow_the_scene_kind(slide, scene):
    for (_, objects), kind in ((slide, "slide"), (scene, "geotiff")):
        assert {o.label for o in objects} <= set(class_names(kind))
        by_label = {o.label: o.shape for o in objects}
        assert all(by_label[name] == name for name in by_label)  # shape = class
    _, objects = scene
    assert all(o.x0 >= 16 and o.y0 >= 16 and o.x1 <= 608 - 16 and o.y1 <= 544 - 16 for o in objects)  # not on collar


def test_ade_crops_match_planted_masks(slide, tmp_path):
    path, objects = slide
    ds = write_ade_crops(path, objects, class_names("slide"), tmp_path, crop=CROP, stride=96, val_fraction=0.25)
    assert ds.classes == ("background", "ellipse", "rect") and read_class_file(tmp_path) == ds.classes
    origins = crop_origins(640, 576, CROP, 96, 0.25)
    for split, folder in (("train", "training"), ("val", "validation")):
        summary = check_segmentation(
            tmp_path / "images" / folder, tmp_path / "annotations" / folder, reduce_zero_label=True
        )
        assert summary.num_images == len(origins[split]) == ds.images[split] > 0
        for i, (x, y) in enumerate(origins[split]):
            label = np.asarray(Image.open(tmp_path / "annotations" / folder / f"ADE_{split}_{i + 1:08d}.png"))
            assert label.shape == (CROP, CROP) and set(np.unique(label)) <= {0, 1, 2, 3}
            expected = np.ones((CROP, CROP), dtype=np.uint8)
            for o in objects:
                expected[o.mask(x, y, CROP, CROP)] = 2 + class_names("slide").index(o.label)
            objects_here = expected >= 2
            np.testing.assert_array_equal(label[objects_here], expected[objects_here])  # every object pixel
            assert ((label >= 2) == objects_here).all()  # and nothing else
            assert (label[~objects_here] != 1).sum() <= 4 * CROP * 2  # only thin rings are ignored
    assert ds.objects["train"] > 0


def test_coco_crops_boxes_are_the_visible_objects(scene, tmp_path):
    path, objects = scene
    ds = write_coco_crops(path, objects, class_names("geotiff"), tmp_path, crop=CROP, stride=96, val_fraction=0.25)
    origins = crop_origins(608, 544, CROP, 96, 0.25)
    for split in ("train", "val"):
        summary = check_coco(tmp_path / "annotations" / f"instances_{split}.json", tmp_path / "images", need_masks=True)
        assert summary.categories == ("rect", "ellipse") and summary.num_images == len(origins[split])
        coco = json.loads((tmp_path / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["annotations"]) == ds.objects[split]
        by_image: dict[int, list[list[float]]] = {}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= CROP and y + h <= CROP and min(w, h) >= 8
            by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h, a["category_id"]])
        for image in coco["images"]:
            cx, cy = origins[split][image["id"] - 1]
            got = sorted(map(tuple, by_image.get(image["id"], [])))
            # Objects wholly inside the crop are annotated with their exact box; slivers are not annotated.
            whole = sorted(
                (o.x0 - cx, o.y0 - cy, o.x1 - cx, o.y1 - cy, 1 + class_names("geotiff").index(o.label))
                for o in objects
                if o.x0 >= cx and o.y0 >= cy and o.x1 <= cx + CROP and o.y1 <= cy + CROP
            )
            assert set(whole) <= set(got)
            for box in got:
                assert any(
                    o.x0 - cx <= box[0] and o.x1 - cx >= box[2] and o.y0 - cy <= box[1] and o.y1 - cy >= box[3]
                    for o in objects
                )


def test_segmentation_scores_against_known_maps(tmp_path):
    objects = [
        Planted(10, 10, 30, 40, label="rect", shape="rect"),
        Planted(50, 5, 80, 25, label="ellipse", shape="ellipse"),
    ]
    classes = ("background", "ellipse", "rect")
    truth = np.zeros((60, 100), dtype=np.uint8)
    for o in objects:
        truth[o.mask(0, 0, 100, 60)] = classes.index(o.label)
    tifffile.imwrite(tmp_path / "perfect.tif", truth)
    perfect = segmentation_scores(tmp_path / "perfect.tif", objects, classes)
    assert perfect["iou"] == {"background": 1.0, "ellipse": 1.0, "rect": 1.0} and perfect["mean_iou_objects"] == 1.0
    half = truth.copy()
    half[10:40, 20:30] = 255  # half of the rect skipped as empty: counts as background
    tifffile.imwrite(tmp_path / "half.tif", half)
    scores = segmentation_scores(tmp_path / "half.tif", objects, classes)
    assert scores["iou"]["rect"] == pytest.approx(0.5) and scores["iou"]["ellipse"] == 1.0
    assert scores["nodata_pixels"] == 300 and scores["confusion"][2][0] == 300


def test_detection_scores_against_known_results(tmp_path):
    objects = [
        Planted(0, 0, 10, 10, label="rect"),
        Planted(20, 20, 40, 40, label="ellipse"),
        Planted(50, 0, 60, 10, label="rect"),
    ]
    classes = ("rect", "ellipse")
    results = [
        {"image_id": 1, "category_id": 0, "bbox": [0, 0, 10, 10], "score": 0.9},  # TP
        {"image_id": 1, "category_id": 0, "bbox": [1, 1, 10, 10], "score": 0.8},  # duplicate: FP
        {"image_id": 1, "category_id": 0, "bbox": [20, 20, 20, 20], "score": 0.7},  # wrong class: FP
        {"image_id": 1, "category_id": 1, "bbox": [22, 22, 20, 20], "score": 0.6},  # IoU 0.68: TP
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    s = detection_scores(path, objects, classes)
    assert (s["tp"], s["detections"], s["objects"]) == (2, 4, 3)
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(4 / 7)
    assert s["per_class"]["ellipse"]["f1"] == 1.0 and s["per_class"]["rect"]["tp"] == 1


EXPECTED_FILES = (
    "slide.tiff", "slide.truth.json", "slide.classes.tif", "slide.classes.preview.png", "slide.classes.summary.json",
    "scene.tif", "scene.truth.json", "scene.objects.geojson", "scene.objects.coco.json", "scene.objects.preview.png",
    "scene.objects.summary.json", "demo_summary.json",
)  # fmt: skip


def independent_scores(out: Path) -> tuple[dict[str, float], dict[str, int]]:
    """The demo's scores recomputed from its files alone, without densevision.demo.score: per-class IoU of the whole
    class map (read at once: the tiny demo's slide is small) against the truth painted in one array, and detection
    precision / recall from a plain greedy match (best score first, IoU of xywh boxes, same class, each object once).
    """
    # The models' classes are those their training data was cut with: background first for segmentation.
    seg_classes = ["background", *json.loads((out / "slide.truth.json").read_text())["classes"]]
    pred = tifffile.imread(out / "slide.classes.tif", level=0).astype(np.int64)  # 255 = skipped as empty
    pred[pred == 255] = 0
    truth = np.zeros_like(pred)
    for o in read_truth(out / "slide.truth.json"):
        truth[o.y0 : o.y1, o.x0 : o.x1][o.mask(o.x0, o.y0, o.x1 - o.x0, o.y1 - o.y0)] = seg_classes.index(o.label)
    iou = {}
    for k, name in enumerate(seg_classes):
        union = ((truth == k) | (pred == k)).sum()
        if union:
            iou[name] = ((truth == k) & (pred == k)).sum() / union
    det_classes = json.loads((out / "scene.truth.json").read_text())["classes"]
    objects = read_truth(out / "scene.truth.json")
    found = [False] * len(objects)
    tp = 0
    detections = json.loads((out / "scene.objects.coco.json").read_text())
    for d in sorted(detections, key=lambda d: -d["score"]):
        x, y, w, h = d["bbox"]
        best, best_iou = None, -1.0
        for i, o in enumerate(objects):
            if found[i] or det_classes.index(o.label) != d["category_id"]:
                continue
            ix = max(0.0, min(x + w, o.x1) - max(x, o.x0))
            iy = max(0.0, min(y + h, o.y1) - max(y, o.y0))
            inter = ix * iy
            v = inter / (w * h + (o.x1 - o.x0) * (o.y1 - o.y0) - inter)
            if v > best_iou:
                best, best_iou = i, v
        if best is not None and best_iou >= 0.5:  # the demo's threshold
            found[best], tp = True, tp + 1
    det = {"tp": tp, "detections": len(detections), "objects": len(objects)}
    return iou, det


@pytest.mark.slow
def test_demo_end_to_end_then_cached(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["demo", "--size", "tiny", "--out", str(out), "--cache-dir", str(cache), "-q"]  # the shipped samples
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training" in printed and f"summary:      {out / 'demo_summary.json'}" in printed
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.partial*"))
    first = json.loads((out / "demo_summary.json").read_text())
    assert first["models_from_cache"] is False
    seg, det = first["segmentation"], first["detection"]
    assert set(seg["scores"]["iou"]) == {"background", "ellipse", "rect"}
    # The scores are those of the files, recomputed independently; the planted count is the preset's.
    iou, found = independent_scores(out)
    assert {k: v for k, v in seg["scores"]["iou"].items() if v is not None} == pytest.approx(iou)
    assert {k: det["scores"][k] for k in found} == found and found["objects"] == PRESETS["tiny"].scene.count
    assert Path(seg["model"]["checkpoint"]).is_relative_to(cache) and seg["model"]["iterations"] == 2
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["detection", "segmentation"]

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training" not in printed and "from the cache" in printed
    second = json.loads((out / "demo_summary.json").read_text())
    assert second["models_from_cache"] is True
    assert second["segmentation"]["model"]["checkpoint"] == seg["model"]["checkpoint"]
    assert second["segmentation"]["scores"] == seg["scores"] and second["detection"]["scores"] == det["scores"]


def test_missing_data_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "densevision.cli", "demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densevision: error: ") and "sample data not found" in lines[0], (
        proc.stderr
    )
    assert proc.stdout == ""
