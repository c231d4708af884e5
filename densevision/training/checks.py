"""Checks of COCO-format and ADE20k-layout datasets, run before any training or evaluation starts.

mmdet and mmseg skip much of what is wrong in a dataset without a word (annotations of unknown categories, images
of the wrong size, label values beyond the classes), or fail deep inside a data-loader worker hours later. These
checks read every annotation once and raise :class:`~densevision.errors.DatasetError` with one line naming the
file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from densevision.errors import DatasetError

# Keys COCO evaluation (pycocotools) and mmdet's CocoDataset read.
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
CATEGORY_KEYS = ("id", "name")
_SHOWN = 3  # offenders named in a message; the rest are counted


def _some(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


@dataclass(frozen=True)
class CocoSummary:
    """A checked COCO instances file."""

    ann_file: Path
    categories: tuple[str, ...]  # names in the file's order (mmdet numbers labels in this order)
    category_ids: tuple[Any, ...]  # their ids, same order
    counts: dict[Any, int]  # annotations per category id (used categories only)
    num_images: int
    num_annotations: int

    @property
    def used(self) -> tuple[str, ...]:
        """Names of the categories that annotations use, in the file's order."""
        return tuple(n for i, n in zip(self.category_ids, self.categories, strict=True) if i in self.counts)


@dataclass(frozen=True)
class SegSummary:
    """A checked image / label-map folder pair."""

    img_dir: Path
    ann_dir: Path
    num_images: int
    labels: tuple[int, ...]  # raw label values present (before reduce-zero-label)
    reduce_zero_label: bool
    ignore_index: int


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header (nothing decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: not a readable image ({e}); replace or remove it") from e


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: no such annotation file; check --data-root and the config's ann_file")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); re-export the COCO annotation file") from e


def _records(path: Path, data: dict[str, Any], key: str, required: Sequence[str]) -> list[dict[str, Any]]:
    records = data[key]
    if not isinstance(records, list):
        raise DatasetError(f"{path}: '{key}' is a {type(records).__name__}, not a list; fix the COCO file")
    for i, r in enumerate(records):
        missing = [k for k in required if not isinstance(r, dict) or k not in r]
        if missing:
            which = f"id {r['id']}" if isinstance(r, dict) and "id" in r else f"entry {i}"
            raise DatasetError(
                f"{path}: {key} {which} lacks {', '.join(repr(k) for k in missing)}; "
                f"each of {key} needs {', '.join(required)}"
            )
    dup = [k for k, n in Counter(r["id"] for r in records).items() if n > 1]
    if dup:
        raise DatasetError(f"{path}: {key} ids {_some(dup)} are used more than once; ids must be unique")
    return records


def check_coco(
    ann_file: str | Path,
    img_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    need_masks: bool = False,
    check_images: bool = True,
) -> CocoSummary:
    """Check a COCO instances file and its images.

    Args:
        ann_file: the JSON file.
        img_dir: folder that ``file_name`` is relative to.
        classes: the config's class names: every category an annotation uses must be among them, in the file's
            order (mmdet numbers labels by the file's category order, not by ``classes``). None: no check.
        need_masks: the pipeline loads masks: every non-crowd annotation needs a ``segmentation``.
        check_images: also check that each image exists and has the declared width and height (header only).

    Raises:
        DatasetError: the first problem found.
    """
    path, img_dir = Path(ann_file), Path(img_dir)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (a JSON object with images, annotations, categories)")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(
            f"{path}: missing top-level key(s) {', '.join(repr(k) for k in missing)}; "
            "a COCO instances file needs images, annotations and categories"
        )
    images = _records(path, data, "images", IMAGE_KEYS)
    anns = _records(path, data, "annotations", ANNOTATION_KEYS)
    cats = _records(path, data, "categories", CATEGORY_KEYS)
    if not images:
        raise DatasetError(f"{path}: the file lists no images; add images or point --data-root elsewhere")
    dup_names = [k for k, n in Counter(c["name"] for c in cats).items() if n > 1]
    if dup_names:
        raise DatasetError(f"{path}: category names {_some(dup_names)} appear twice; names must be unique")

    image_ids = {im["id"] for im in images}
    cat_name = {c["id"]: str(c["name"]) for c in cats}
    orphans = [a["id"] for a in anns if a["image_id"] not in image_ids]
    if orphans:
        raise DatasetError(f"{path}: annotations {_some(orphans)} refer to image ids not in 'images'; fix image_id")
    unknown = sorted({a["category_id"] for a in anns if a["category_id"] not in cat_name}, key=str)
    if unknown:
        raise DatasetError(
            f"{path}: annotations use category ids {_some(unknown)} that 'categories' does not define; "
            "add them to categories or fix category_id"
        )
    bad = [a["id"] for a in anns if not _valid_box(a["bbox"])]
    if bad:
        raise DatasetError(f"{path}: annotations {_some(bad)} have no valid bbox [x, y, width >= 0, height >= 0]")
    if need_masks:
        no_mask = [a["id"] for a in anns if not a["iscrowd"] and not a.get("segmentation")]
        if no_mask:
            raise DatasetError(
                f"{path}: annotations {_some(no_mask)} have no 'segmentation' and the config trains masks; "
                "add polygons or RLE, or use a detection-only config"
            )

    if check_images:
        _check_images(path, img_dir, images)
    summary = CocoSummary(
        path,
        tuple(cat_name[c["id"]] for c in cats),
        tuple(c["id"] for c in cats),
        dict(Counter(a["category_id"] for a in anns)),
        len(images),
        len(anns),
    )
    if classes is not None:
        check_coco_classes(summary, classes)
    return summary


def _valid_box(box: Any) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, int | float) and math.isfinite(v) for v in box)
        and box[2] >= 0
        and box[3] >= 0
    )


def check_coco_classes(summary: CocoSummary, classes: Sequence[str]) -> None:
    """Every category that annotations use must be among ``classes``, in the file's order (mmdet numbers labels by
    the file's category order, whatever the order of ``classes``)."""
    names = dict(zip(summary.category_ids, summary.categories, strict=True))
    outside = [
        f"{cid} ({names[cid]!r}, {n} annotations)" for cid, n in summary.counts.items() if names[cid] not in classes
    ]
    if outside:
        raise DatasetError(
            f"{summary.ann_file}: category ids {_some(outside)} are not among the config's classes {tuple(classes)}; "
            "add them to metainfo.classes or drop the config's metainfo to take the classes from the data"
        )
    in_file = [n for n in summary.categories if n in classes]
    in_config = [c for c in classes if c in in_file]
    if in_file != in_config:
        raise DatasetError(
            f"{summary.ann_file}: categories are listed in the order {in_file} but the config's classes in "
            f"{in_config}; mmdet numbers labels by the file's order: list the classes in that order"
        )


def _check_images(path: Path, img_dir: Path, images: list[dict[str, Any]]) -> None:
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir}: no such image folder (for {path.name}); check --data-root and data_prefix")
    absent = [im["file_name"] for im in images if not (img_dir / im["file_name"]).is_file()]
    if absent:
        raise DatasetError(
            f"{path}: {len(absent)} of {len(images)} images do not exist under {img_dir} ({_some(absent)}); "
            "check --data-root and data_prefix"
        )
    for im in images:
        size = _image_size(img_dir / im["file_name"])
        if size != (im["width"], im["height"]):
            raise DatasetError(
                f"{img_dir / im['file_name']}: image is {size[0]} x {size[1]} px but {path.name} declares "
                f"{im['width']} x {im['height']}; fix width / height or the image"
            )


def _files(folder: Path, suffix: str) -> dict[str, Path]:
    """Files under ``folder`` (recursively, as mmseg lists them) by path relative to it, minus the suffix."""
    return {str(p.relative_to(folder))[: -len(suffix)]: p for p in sorted(folder.rglob(f"*{suffix}")) if p.is_file()}


def check_segmentation(
    img_dir: str | Path,
    ann_dir: str | Path,
    *,
    img_suffix: str = ".jpg",
    seg_map_suffix: str = ".png",
    reduce_zero_label: bool = True,
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> SegSummary:
    """Check an image folder and its label-map folder (ADE20k layout and mmseg's BaseSegDataset).

    Every image needs a single-band label map of the same size (same relative path, ``seg_map_suffix``). With
    ``reduce_zero_label`` (ADE), raw labels are 0 (ignored) and 1..num_classes (255 is ignored too); without it
    0..num_classes-1 and ``ignore_index``.

    Raises:
        DatasetError: the first problem found.
    """
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir}: no such image folder; check --data-root and data_prefix.img_path")
    images = _files(img_dir, img_suffix)
    if not images:
        raise DatasetError(f"{img_dir}: no *{img_suffix} images; check --data-root and data_prefix.img_path")
    if not ann_dir.is_dir():
        raise DatasetError(f"{ann_dir}: no such label folder; check --data-root and data_prefix.seg_map_path")
    labels = _files(ann_dir, seg_map_suffix)
    absent = [k + seg_map_suffix for k in images if k not in labels]
    if absent:
        raise DatasetError(
            f"{ann_dir}: {len(absent)} of {len(images)} images have no label map ({_some(absent)}); "
            f"each image needs a {seg_map_suffix} of the same name"
        )
    present: set[int] = set()
    for key, img in images.items():
        label_path = labels[key]
        try:
            with Image.open(label_path) as lab:
                mode, size = lab.mode, lab.size
                values = np.unique(np.asarray(lab)) if mode in ("L", "P", "I;16", "I") else None
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{label_path}: not a readable label map ({e}); replace or remove it") from e
        if values is None:
            raise DatasetError(
                f"{label_path}: label map has mode {mode} ({len(mode)} bands); labels must be one band of "
                "class indices (8-bit grey or palette PNG)"
            )
        img_size = _image_size(img)
        if size != img_size:
            raise DatasetError(
                f"{label_path}: label map is {size[0]} x {size[1]} px but its image is "
                f"{img_size[0]} x {img_size[1]}; labels must match their image pixel for pixel"
            )
        present.update(int(v) for v in values)
    summary = SegSummary(img_dir, ann_dir, len(images), tuple(sorted(present)), reduce_zero_label, ignore_index)
    if num_classes is not None:
        check_label_values(summary, num_classes)
    return summary


def check_label_values(summary: SegSummary, num_classes: int) -> None:
    """The label values present must name one of ``num_classes`` classes or be ignored."""
    # Reduce-zero-label maps raw 0 and raw 255 to the ignore index, and raw k to class k - 1.
    if summary.reduce_zero_label:
        valid = set(range(1, num_classes + 1)) | {0, 255}
    else:
        valid = set(range(num_classes)) | {summary.ignore_index}
    beyond = sorted(set(summary.labels) - valid)
    if beyond:
        rule = "0 = other, 1..K" if summary.reduce_zero_label else f"0..K-1, {summary.ignore_index} = ignore"
        raise DatasetError(
            f"{summary.ann_dir}: label values {_some(beyond)} exceed the {num_classes} classes (labels {rule}); "
            "name all classes (metainfo.classes or objectInfo*.txt) or fix the label maps"
        )


_NAME_SPLIT = re.compile(r"[;,]")


def read_class_file(data_root: str | Path) -> tuple[str, ...] | None:
    """Class names from ADE's ``objectInfo<K>.txt`` in ``data_root`` (tab-separated ``Idx Ratio Train Val Name``,
    names possibly listing synonyms after ``;`` or ``,``: the first is kept), or None when there is none."""
    root = Path(data_root)
    found = sorted(root.glob("objectInfo*.txt")) if root.is_dir() else []
    if not found:
        return None
    if len(found) > 1:
        raise DatasetError(f"{root}: several class files ({_some([p.name for p in found])}); keep one objectInfo*.txt")
    lines = [ln for ln in found[0].read_text().splitlines() if ln.strip()]
    names: list[str] = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip().isdigit() or int(fields[0]) != len(names) + 1:
            raise DatasetError(
                f"{found[0]}: line {n} is not 'Idx<TAB>...<TAB>Name' with Idx {len(names) + 1}; "
                "rows must number the classes 1..K in order"
            )
        names.append(_NAME_SPLIT.split(fields[-1])[0].strip())
    if not names:
        raise DatasetError(f"{found[0]}: names no classes; add one row per class or remove the file")
    return tuple(names)
