"""Training data cut from a generated image with planted objects: square crops written as an ADE20k-layout
semantic segmentation dataset or a COCO instance dataset, labels taken from the planted objects' exact masks.

Crops lie on a regular grid (``stride``); crops of the bottom ``val_fraction`` of the image's rows go to the
validation split, the others (wholly above it) to training, so the two splits share no pixel. Pixels are read
through :func:`densevision.open_image`, as the inference engine reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from densevision.errors import ConfigError
from densevision.io import open_image
from densevision.synthetic.datasets import ADE_SPLITS, compressed_rle, write_object_info
from densevision.synthetic.planted import Planted

BACKGROUND = "background"
# A label value ADE's reduce-zero-label convention ignores: pixels JPEG blurs at object edges, and nodata.
IGNORE = 0


@dataclass(frozen=True)
class CropDataset:
    """What a writer produced: the root (``data_root`` for training), the classes in label order, and per split
    the number of images and annotated objects (COCO) or object pixels (ADE)."""

    root: Path
    classes: tuple[str, ...]
    images: dict[str, int]
    objects: dict[str, int]


@dataclass(frozen=True)
class _Crop:
    split: str
    index: int  # within the split
    x: int
    y: int
    pixels: np.ndarray  # crop x crop x 3 uint8
    valid: np.ndarray  # crop x crop bool
    objects: list[Planted]  # those meeting the crop


def crop_origins(
    width: int, height: int, crop: int, stride: int, val_fraction: float
) -> dict[str, list[tuple[int, int]]]:
    """Top-left corners of the crops per split: a grid of ``stride`` over the image (the last row / column moved
    in to end at the border); validation crops lie wholly in the bottom ``val_fraction`` of the rows (at least one
    crop's height), training crops wholly above it."""
    if crop > min(width, height) or stride <= 0:
        raise ConfigError(f"crops of {crop} px with stride {stride} do not fit a {width} x {height} image")
    split_y = height - (max(round(height * val_fraction), crop) if val_fraction > 0 else 0)

    def axis(lo: int, hi: int) -> list[int]:
        if hi - lo < crop:
            return []
        return sorted({*range(lo, hi - crop + 1, stride), hi - crop})

    xs = axis(0, width)
    return {
        "train": [(x, y) for y in axis(0, split_y) for x in xs],
        "val": [(x, y) for y in axis(split_y, height) for x in xs] if val_fraction > 0 else [],
    }


def _crops(image: Path, objects: Sequence[Planted], crop: int, stride: int, val_fraction: float) -> Iterator[_Crop]:
    with open_image(image) as src:
        width, height = src.size
        for split, origins in crop_origins(width, height, crop, stride, val_fraction).items():
            for i, (x, y) in enumerate(origins):
                region = src.read_region((x, y), 0, (crop, crop))
                meeting = [o for o in objects if o.x0 < x + crop and o.x1 > x and o.y0 < y + crop and o.y1 > y]
                yield _Crop(split, i, x, y, region.pixels[..., :3], region.valid, meeting)


def _class_index(classes: Sequence[str], obj: Planted) -> int:
    try:
        return list(classes).index(obj.label)
    except ValueError:
        raise ConfigError(f"planted object {obj.box} has label {obj.label!r}, not one of {tuple(classes)}") from None


def write_ade_crops(
    image: str | Path,
    objects: Sequence[Planted],
    classes: Sequence[str],
    root: str | Path,
    *,
    crop: int = 256,
    stride: int = 256,
    val_fraction: float = 0.125,
    only_with_objects: bool = False,
) -> CropDataset:
    """Write crops of ``image`` and their label maps under ``root`` in ADE20k's layout; with
    ``only_with_objects``, only the training crops that hold object pixels (so that a small model trained for a few
    hundred iterations sees the rare classes often enough; mostly-glass slides are otherwise all background).

    Labels (reduce-zero-label convention): 0 ignored (a one-pixel ring outside each object, where JPEG blurs its
    edge, and pixels outside the image or nodata), 1 ``background``, ``2 + i`` the object class ``classes[i]``
    (planted objects' ``label``). ``objectInfo<K>.txt`` names the K classes as ADE's ``objectInfo150.txt`` does.
    """
    root = Path(root)
    names = (BACKGROUND, *classes)
    pixel_count = np.zeros(len(names) + 1, dtype=np.int64)
    image_count = {split: np.zeros(len(names) + 1, dtype=np.int64) for split in ADE_SPLITS}
    images = dict.fromkeys(ADE_SPLITS, 0)
    object_pixels = dict.fromkeys(ADE_SPLITS, 0)
    for split in ADE_SPLITS.values():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for c in _crops(Path(image), objects, crop, stride, val_fraction):
        label = np.where(c.valid, 1, IGNORE).astype(np.uint8)
        masks = [(o, o.mask(c.x, c.y, crop, crop)) for o in c.objects]
        for _, m in masks:
            label[ndimage.binary_dilation(m) & ~m] = IGNORE
        for o, m in masks:  # objects after rings: a ring never eats an object
            label[m & c.valid] = 2 + _class_index(classes, o)
        if only_with_objects and c.split == "train" and not (label >= 2).any():
            continue
        stem = f"ADE_{c.split}_{images[c.split] + 1:08d}"
        folder = ADE_SPLITS[c.split]
        Image.fromarray(np.ascontiguousarray(c.pixels)).save(root / "images" / folder / f"{stem}.jpg", quality=95)
        Image.fromarray(label).save(root / "annotations" / folder / f"{stem}.png")
        values = np.bincount(label.ravel(), minlength=len(names) + 1)
        pixel_count += values
        image_count[c.split] += values > 0
        images[c.split] += 1
        object_pixels[c.split] += int(values[2:].sum())
    write_object_info(root, names, pixel_count, image_count)
    return CropDataset(root, names, images, object_pixels)


def write_coco_crops(
    image: str | Path,
    objects: Sequence[Planted],
    classes: Sequence[str],
    root: str | Path,
    *,
    crop: int = 256,
    stride: int = 256,
    val_fraction: float = 0.125,
    min_visible: float = 0.3,
    min_side: int = 8,
) -> CropDataset:
    """Write crops of ``image`` under ``root`` as a COCO instance dataset (``images/``,
    ``annotations/instances_{train,val}.json``; category ids ``1..K`` for ``classes``).

    Each planted object meeting a crop is annotated with the tight box and RLE mask of its pixels inside the crop,
    unless it is cut to a sliver: fewer than ``min_visible`` of its pixels inside, or a side under ``min_side``
    pixels.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(classes)]
    coco: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"images": [], "annotations": []} for s in ADE_SPLITS}
    ann_id = 1
    for c in _crops(Path(image), objects, crop, stride, val_fraction):
        record = coco[c.split]
        image_id = len(record["images"]) + 1
        name = f"{c.split}_{c.index:06d}.jpg"
        Image.fromarray(np.ascontiguousarray(c.pixels)).save(root / "images" / name, quality=95)
        record["images"].append({"id": image_id, "file_name": name, "width": crop, "height": crop})
        for o in c.objects:
            m = o.mask(c.x, c.y, crop, crop)
            ys, xs = np.nonzero(m)
            if len(xs) == 0:
                continue
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            if len(xs) < min_visible * o.area or min(x1 - x0, y1 - y0) < min_side:
                continue
            record["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": _class_index(classes, o) + 1,
                    "segmentation": compressed_rle(m),
                    "area": float(len(xs)),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    for split, record in coco.items():
        doc = {
            "info": {"description": f"densevision demo crops of {Path(image).name} ({split})", "version": "1.0"},
            "licenses": [],
            **record,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return CropDataset(
        root,
        tuple(classes),
        {s: len(r["images"]) for s, r in coco.items()},
        {s: len(r["annotations"]) for s, r in coco.items()},
    )
