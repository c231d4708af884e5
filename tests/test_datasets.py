"""The tiny dataset generators write real COCO / ADE20k data (read back by pycocotools, mmdet and mmseg), and the
dataset checks reject each kind of bad input with a one-line DatasetError."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from densevision.errors import ConfigError, DatasetError
from densevision.synthetic.datasets import make_ade_dataset, make_coco_dataset
from densevision.training.checks import check_coco, check_segmentation, read_class_file


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), num_train=8, num_val=4, image_size=(112, 96), seed=3)


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return make_ade_dataset(tmp_path_factory.mktemp("ade"), num_train=6, num_val=3, image_size=(100, 90), seed=4)


def _kind(segmentation) -> str:
    if isinstance(segmentation, list):
        return "polygon"
    return "uncompressed" if isinstance(segmentation["counts"], list) else "rle"


def test_coco_annotations_decode_to_the_planted_masks(coco):
    for split in ("train", "val"):
        api = COCO(str(coco.files[split]))
        anns = api.loadAnns(api.getAnnIds())
        assert len(anns) == len(coco.objects[split]) > 0
        assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(coco.classes)
        for ann, obj in zip(anns, coco.objects[split], strict=True):
            img = api.loadImgs(ann["image_id"])[0]
            assert img["file_name"] == obj.file_name and (img["width"], img["height"]) == (112, 96)
            np.testing.assert_array_equal(api.annToMask(ann).astype(bool), coco.mask(obj))
            assert api.loadCats(ann["category_id"])[0]["name"] == obj.label
            assert ann["area"] == coco.mask(obj).sum()
            x0, y0, x1, y1 = obj.box
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert ann["iscrowd"] == int(obj.iscrowd)
    kinds = {
        (_kind(a["segmentation"]), a["iscrowd"]) for a in json.loads(coco.files["train"].read_text())["annotations"]
    }
    assert {("polygon", 0), ("rle", 0), ("uncompressed", 1)} <= kinds  # every COCO segmentation form is used


def test_coco_images_show_the_objects(coco):
    """Pixels under a mask carry the object's colour (JPEG-close), the class's dominant channel."""
    for obj in [o for o in coco.objects["train"] if not o.iscrowd][:8]:
        pixels = np.asarray(Image.open(coco.root / "images" / obj.file_name), dtype=np.float64)
        inside = pixels[ndimage.binary_erosion(coco.mask(obj), iterations=2)]  # away from JPEG-blurred edges
        assert len(inside) > 20
        assert inside.std(axis=0).max() < 12  # one flat colour
        assert inside.mean(axis=0).argmax() == {"disc": 0, "square": 1, "triangle": 2}[obj.label]


def test_coco_shapes_are_what_they_say(coco):
    """Squares fill their box, discs are round, triangles widen row by row from an apex to a full-width base."""
    seen = set()
    for obj in [o for o in coco.objects["train"] + coco.objects["val"] if not o.iscrowd]:
        x0, y0, x1, y1 = obj.box
        w, h, area = x1 - x0, y1 - y0, int(coco.mask(obj).sum())
        seen.add(obj.label)
        if obj.label == "square":
            assert area == w * h
        elif obj.label == "disc":
            assert abs(w - h) <= 1 and abs(area - np.pi * w * h / 4) <= 0.06 * area
        else:
            rows = coco.mask(obj)[y0:y1].sum(axis=1)
            assert (np.diff(rows) >= 0).all() and rows[0] <= 3 and rows[-1] == w
            assert abs(area - w * h / 2) <= 0.1 * area
    assert seen == {"disc", "square", "triangle"}


def test_mmdet_loads_the_generated_coco_with_masks(coco):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules

    register_all_modules()
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs"),
    ]
    dataset = CocoDataset(
        data_root=str(coco.root),
        ann_file="annotations/instances_train.json",
        data_prefix=dict(img="images/"),
        metainfo=dict(classes=coco.classes),
        pipeline=pipeline,
    )
    assert len(dataset) == 8
    sample = dataset[3]["data_samples"]  # image 4 holds a crowd (crowd_every=4)
    planted = [o for o in coco.objects["train"] if o.image_id == 4]
    assert len(sample.gt_instances) + len(sample.ignored_instances) == len(planted)
    masks = np.concatenate([sample.gt_instances.masks.to_ndarray(), sample.ignored_instances.masks.to_ndarray()])
    for m, obj in zip(masks, [o for o in planted if not o.iscrowd] + [o for o in planted if o.iscrowd], strict=True):
        np.testing.assert_array_equal(m.astype(bool), coco.mask(obj))


def test_ade_layout_and_labels(ade):
    root = ade.root
    assert ade.classes == ("background", "disc", "square", "triangle")
    assert read_class_file(root) == ade.classes
    for split, folder in (("train", "training"), ("val", "validation")):
        images = sorted((root / "images" / folder).glob("*.jpg"))
        labels = sorted((root / "annotations" / folder).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] and len(images) == (6 if split == "train" else 3)
        assert images[0].name == f"ADE_{split}_00000001.jpg"
    for obj in ade.objects["train"]:
        label = np.asarray(Image.open(root / "annotations" / "training" / obj.file_name.replace(".jpg", ".png")))
        assert label.shape == (90, 100) and label.dtype == np.uint8
        assert (label[ade.mask(obj)] == ade.classes.index(obj.label) + 1).all()
    label = np.asarray(Image.open(root / "annotations" / "training" / "ADE_train_00000001.png"))
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4} and {0, 1} <= set(np.unique(label))  # 0: the rings


def test_ade_without_ignored_edges_labels_every_pixel(tmp_path, ade):
    full = make_ade_dataset(tmp_path, num_train=6, num_val=0, image_size=(100, 90), seed=4, ignore_edges=False)
    for name in ("ADE_train_00000001.png", "ADE_train_00000004.png"):
        ringed = np.asarray(Image.open(ade.root / "annotations" / "training" / name))
        label = np.asarray(Image.open(full.root / "annotations" / "training" / name))
        assert (label > 0).all()  # the ring pixels take the background class
        np.testing.assert_array_equal(label[ringed > 0], ringed[ringed > 0])  # same scene, same seed


def test_mmseg_reads_the_generated_ade_with_reduce_zero_label(ade):
    from mmseg.datasets import BaseSegDataset
    from mmseg.utils import register_all_modules

    register_all_modules()
    dataset = BaseSegDataset(
        data_root=str(ade.root),
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
        img_suffix=".jpg",
        seg_map_suffix=".png",
        reduce_zero_label=True,
        metainfo=dict(classes=ade.classes),
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")],
    )
    assert len(dataset) == 6
    seg = dataset[0]["data_samples"].gt_sem_seg.data.numpy()[0]
    raw = np.asarray(Image.open(ade.root / "annotations" / "training" / "ADE_train_00000001.png"))
    np.testing.assert_array_equal(seg[raw == 0], 255)  # other -> ignore
    np.testing.assert_array_equal(seg[raw > 0], raw[raw > 0] - 1)  # classes 1..K -> 0..K-1


def test_generators_are_deterministic(tmp_path):
    a = make_coco_dataset(tmp_path / "a", num_train=2, num_val=1, seed=7)
    b = make_coco_dataset(tmp_path / "b", num_train=2, num_val=1, seed=7)
    assert a.files["train"].read_text() == b.files["train"].read_text()
    assert (a.root / "images" / "train_000001.jpg").read_bytes() == (
        b.root / "images" / "train_000001.jpg"
    ).read_bytes()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image_size=32), "too small"),
        (dict(shapes=("hexagon",)), "shapes must be"),
        (dict(num_train=0, num_val=0), "not all 0"),
        (dict(objects_per_image=(3, 1)), "objects per image"),
    ],
)
def test_generator_arguments(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_coco_dataset(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the file and the fix.


def _copy_coco(coco, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco.root, root)
    return root, root / "annotations" / "instances_train.json", json.loads(coco.files["train"].read_text())


def _check(root, ann, data, **kwargs):
    ann.write_text(json.dumps(data))
    return check_coco(ann, root / "images", **kwargs)


def _raises(fn, *needles):
    with pytest.raises(DatasetError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def test_check_coco_accepts_the_generated_data(coco):
    summary = check_coco(coco.files["train"], coco.root / "images", classes=coco.classes, need_masks=True)
    assert summary.num_images == 8 and summary.categories == coco.classes and summary.num_annotations > 8


@pytest.mark.parametrize(
    "corrupt,needles",
    [
        (lambda d: d.pop("categories"), ["missing top-level key(s) 'categories'"]),
        (lambda d: d["annotations"][2].pop("area"), ["annotations id 3 lacks 'area'"]),
        (lambda d: d["annotations"][0].pop("iscrowd"), ["lacks 'iscrowd'"]),
        (lambda d: d["images"][1].pop("file_name"), ["images id 2 lacks 'file_name'"]),
        (lambda d: d.update(images=[], annotations=[]), ["lists no images"]),
        (lambda d: d["annotations"][0].update(category_id=9), ["category ids 9", "does not define"]),
        (lambda d: d["annotations"][0].update(image_id=999), ["refer to image ids not in 'images'"]),
        (lambda d: d["annotations"][1].update(id=1), ["ids 1 are used more than once"]),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), ["no valid bbox"]),
        (lambda d: d["images"][0].update(width=50), ["image is 112 x 96 px but", "declares 50 x 96"]),
        (lambda d: d["images"][0].update(file_name="nope.jpg"), ["1 of 8 images do not exist", "nope.jpg"]),
        (lambda d: d["annotations"][0].pop("segmentation"), ["no 'segmentation'", "trains masks"]),
    ],
)
def test_check_coco_rejects(coco, tmp_path, corrupt, needles):
    root, ann, data = _copy_coco(coco, tmp_path)
    corrupt(data)
    text = _raises(lambda: _check(root, ann, data, need_masks=True), *needles)
    assert text.startswith(str(root)), text  # names the file at fault


def test_check_coco_categories_against_the_config_classes(coco, tmp_path):
    root, ann, data = _copy_coco(coco, tmp_path)
    _raises(
        lambda: _check(root, ann, data, classes=("disc", "square")),
        "category ids 3 ('triangle'",
        "not among the config's classes",
    )
    # mmdet numbers labels in the file's category order: a config listing them otherwise would swap names.
    _raises(lambda: _check(root, ann, data, classes=("square", "disc", "triangle")), "mmdet numbers labels")
    assert _check(root, ann, data, classes=("disc", "other", "square", "triangle")).used == coco.classes


def test_check_coco_missing_or_unreadable_files(coco, tmp_path):
    _raises(lambda: check_coco(tmp_path / "none.json", tmp_path), "no such annotation file")
    (tmp_path / "bad.json").write_text("{not json")
    _raises(lambda: check_coco(tmp_path / "bad.json", tmp_path), "not valid JSON")
    root, ann, data = _copy_coco(coco, tmp_path)
    (root / "images" / data["images"][0]["file_name"]).write_bytes(b"not a jpeg")
    _raises(lambda: _check(root, ann, data), "not a readable image")


def _copy_ade(ade, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(ade.root, root)
    return root, root / "images" / "training", root / "annotations" / "training"


def test_check_segmentation_accepts_the_generated_data(ade):
    s = check_segmentation(ade.root / "images/training", ade.root / "annotations/training", num_classes=4)
    assert s.num_images == 6 and s.labels == (0, 1, 2, 3, 4)


def test_check_segmentation_wrong_label_size(ade, tmp_path):
    _root, img_dir, ann_dir = _copy_ade(ade, tmp_path)
    Image.fromarray(np.ones((90, 99), np.uint8)).save(ann_dir / "ADE_train_00000002.png")
    _raises(
        lambda: check_segmentation(img_dir, ann_dir),
        "ADE_train_00000002.png: label map is 99 x 90 px but its image is 100 x 90",
    )


@pytest.mark.parametrize(
    "corrupt,needles",
    [
        (lambda img, ann: (ann / "ADE_train_00000003.png").unlink(), ["1 of 6 images have no label map"]),
        (lambda img, ann: [p.unlink() for p in img.glob("*.jpg")], ["no *.jpg images"]),
        (lambda img, ann: shutil.rmtree(ann), ["no such label folder"]),
        (
            lambda img, ann: Image.new("RGB", (100, 90)).save(ann / "ADE_train_00000001.png"),
            ["mode RGB (3 bands)"],
        ),
        (
            lambda img, ann: Image.fromarray(np.full((90, 100), 7, np.uint8)).save(ann / "ADE_train_00000001.png"),
            ["label values 7 exceed the 4 classes"],
        ),
    ],
)
def test_check_segmentation_rejects(ade, tmp_path, corrupt, needles):
    _root, img_dir, ann_dir = _copy_ade(ade, tmp_path)
    corrupt(img_dir, ann_dir)
    _raises(lambda: check_segmentation(img_dir, ann_dir, num_classes=4), *needles)


def test_check_segmentation_without_reduce_zero_label(ade):
    """Labels 0..K-1 plus 255: ADE's raw 4 is out of range for 4 classes when 0 is a class."""
    img, ann = ade.root / "images/training", ade.root / "annotations/training"
    _raises(lambda: check_segmentation(img, ann, reduce_zero_label=False, num_classes=4), "label values 4")
    check_segmentation(img, ann, reduce_zero_label=False, num_classes=5)


def test_read_class_file(tmp_path):
    assert read_class_file(tmp_path) is None
    (tmp_path / "objectInfo3.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t10\t1\twall\n2\t0.1\t5\t1\tbuilding;edifice\n3\t0.1\t2\t1\tsky\n"
    )
    assert read_class_file(tmp_path) == ("wall", "building", "sky")
    (tmp_path / "objectInfo3.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n2\t0.1\t10\t1\twall\n")
    _raises(lambda: read_class_file(tmp_path), "line 2", "Idx 1")
    (tmp_path / "objectInfo150.txt").write_text("")
    _raises(lambda: read_class_file(tmp_path), "several class files")
