"""Tiny datasets of planted objects in real formats, for tests, demos and learning benchmarks.

Each image is a smooth random texture with a few coloured objects (classes ``disc``, ``square``, ``triangle`` by
default) planted apart from each other; each class has its own hue (jittered), so a model can learn it in a few
hundred iterations. Every object is returned as a :class:`~densevision.synthetic.planted.Planted` (a disc is an
``ellipse``, a square or triangle a ``polygon``; ``label`` is the class, ``file_name`` / ``image_id`` the image).

- :func:`make_coco_dataset`: COCO instances JSON (``annotations/instances_{train,val}.json``, images under
  ``images/``). Squares and triangles carry polygon ``segmentation``, discs compressed RLE; some images hold a
  crowd (``iscrowd=1``, uncompressed RLE) of small discs, which COCO evaluation ignores. ``area`` and ``bbox`` are
  those of the annotated segmentation, as in COCO.
- :func:`make_ade_dataset`: ADEChallengeData2016 layout (``images/{training,validation}/*.jpg``,
  ``annotations/{training,validation}/*.png``, ``objectInfo<K>.txt``) with ADE's reduce-zero-label convention:
  label 0 is "other" (ignored in training and evaluation): here a one-pixel ring around each object, where JPEG
  blurs the edge; labels 1..K are the classes, ``background`` first by default.

Pixel ``(x, y)`` belongs to a disc when its centre ``(x + 0.5, y + 0.5)`` lies inside it; squares and triangles are
the pixels that COCO's polygon rasteriser (pycocotools) fills for their vertices, so what is annotated is exactly
what is painted (:mod:`densevision.synthetic.planted`). Everything depends only on ``seed``: the same call writes
the same files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from densevision.errors import ConfigError, OutputError
from densevision.synthetic.planted import Planted, box_around, tighten

# The classes a dataset can hold, each drawn as one planted shape.
CLASSES = ("disc", "square", "triangle")
# One hue per class (RGB), jittered per object.
_COLORS = ((220, 40, 40), (40, 190, 60), (50, 70, 230), (230, 200, 20), (200, 40, 220), (30, 200, 210))


@dataclass(frozen=True)
class SyntheticDataset:
    """What a generator wrote: the root, the class names (in label order), every planted object per split (its
    ``label`` the class, its ``file_name`` the image) and the image size ``(W, H)``."""

    root: Path
    classes: tuple[str, ...]
    objects: dict[str, list[Planted]]
    files: dict[str, Path]  # split -> annotation file (COCO) or annotation folder (ADE)
    image_size: tuple[int, int]

    def mask(self, obj: Planted) -> np.ndarray:
        """``H x W`` bool: the pixels of ``obj`` in its image."""
        return obj.mask(0, 0, *self.image_size)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``h x w x 3`` uint8: muted low-frequency colour blobs plus fine grain."""
    base = rng.uniform(90, 170, size=3)
    coarse = rng.normal(0, 25, size=(max(2, h // 16), max(2, w // 16), 3))
    smooth = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1], 1), order=3)[:h, :w]
    grain = rng.normal(0, 8, size=(h, w, 3))
    return np.clip(base + smooth + grain, 0, 255).astype(np.uint8)


def _disc(cx: float, cy: float, r: float) -> Planted:
    """The disc of radius ``r`` around ``(cx, cy)``: pixels whose centres lie within it."""
    box = (math.floor(cx - r), math.floor(cy - r), math.ceil(cx + r) + 1, math.ceil(cy + r) + 1)
    return Planted(*box, shape="ellipse", label="disc", ellipse=(cx, cy, r, r))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    """COCO polygon ``[x1, y1, x2, y2, ...]``: the square of half side ``r`` centred at ``(cx, cy)`` (integer
    corners), or the upward triangle inscribed in it."""
    x0, y0, x1, y1 = round(cx - r), round(cy - r), round(cx + r), round(cy + r)
    if shape == "square":
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    return [(x0 + x1) / 2, y0, x1, y1, x0, y1]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (crowd annotations): run lengths over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}


def _as_rle(segmentation: Any, h: int, w: int) -> Any:
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, h, w)
    return {"counts": segmentation["counts"].encode("ascii"), "size": segmentation["size"]}


def _color(rng: np.random.Generator, k: int, jitter: float) -> np.ndarray:
    return np.clip(np.array(_COLORS[k % len(_COLORS)]) + rng.uniform(-jitter, jitter, size=3), 0, 255)


@dataclass
class _Scene:
    pixels: np.ndarray  # h x w x 3 uint8
    objects: list[tuple[Planted, np.ndarray]]  # each object with its h x w mask; a crowd (iscrowd) last


def _paint(pixels: np.ndarray, obj: Planted, color: np.ndarray) -> tuple[Planted, np.ndarray]:
    """Paint ``obj`` in ``color`` (float, truncated to uint8 as the pixels store it); the object with its colour and
    exact box, and its mask."""
    h, w = pixels.shape[:2]
    m = obj.mask(0, 0, w, h)
    pixels[m] = color
    painted = tighten(replace(obj, color=tuple(int(v) for v in color)), w, h)
    assert painted is not None  # every object lies inside its image by construction
    return painted, m


def _scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    shapes: Sequence[str],
    per_image: tuple[int, int],
    crowd: bool,
    jitter: float,
) -> _Scene:
    """One image: objects in distinct cells of a 3 x 3 grid (apart by construction), optionally a crowd."""
    w, h = size
    grid = 3
    cw, ch = w / grid, h / grid
    pixels = _texture(rng, h, w)
    n = int(rng.integers(per_image[0], per_image[1] + 1))
    cells = rng.permutation(grid * grid)
    objects = []
    for c in cells[:n]:
        k = int(rng.integers(len(shapes)))
        r = float(rng.uniform(0.28, 0.45) * min(cw, ch))
        cx = (c % grid + 0.5) * cw + float(rng.uniform(-0.05, 0.05)) * cw
        cy = (c // grid + 0.5) * ch + float(rng.uniform(-0.05, 0.05)) * ch
        if shapes[k] == "disc":
            obj = _disc(cx, cy, r)
        else:
            polygon = _polygon(shapes[k], cx, cy, r)
            obj = Planted(*box_around(polygon), shape="polygon", label=shapes[k], polygon=tuple(polygon))
        objects.append(_paint(pixels, obj, _color(rng, k, jitter)))
    if crowd and "disc" in shapes and n < grid * grid:
        c = int(cells[n])
        k = list(shapes).index("disc")
        x0, y0 = (c % grid) * cw, (c // grid) * ch
        parts = tuple(
            _disc(x0 + dx * cw, y0 + dy * ch, 0.12 * min(cw, ch))
            for dx, dy in ((0.25, 0.25), (0.7, 0.3), (0.35, 0.72), (0.75, 0.75))
        )
        group = Planted(0, 0, w, h, shape="ellipse", label="disc", parts=parts, iscrowd=True)
        objects.append(_paint(pixels, group, _color(rng, k, jitter)))
    return _Scene(pixels, objects)


def _check_args(num: dict[str, int], size: tuple[int, int], shapes: Sequence[str], per_image: tuple[int, int]) -> None:
    if any(v < 0 for v in num.values()) or not any(num.values()):
        raise ConfigError(f"image counts must be >= 0 and not all 0, got {num}")
    if min(size) < 48:
        raise ConfigError(f"image size {size} is too small for a 3 x 3 grid of objects; use at least 48 x 48 px")
    unknown = [s for s in shapes if s not in CLASSES]
    if unknown or not shapes:
        raise ConfigError(f"shapes must be a non-empty subset of {CLASSES}, got {tuple(shapes)}")
    if not 0 <= per_image[0] <= per_image[1] <= 8:
        raise ConfigError(f"objects per image must be 0 <= min <= max <= 8, got {per_image}")


def _prepare_root(root: str | Path) -> Path:
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{root}: cannot create the dataset folder ({e.strerror}); choose a writable path") from e
    return root


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def make_coco_dataset(
    root: str | Path,
    *,
    num_train: int = 16,
    num_val: int = 8,
    image_size: int | tuple[int, int] = 128,
    shapes: Sequence[str] = CLASSES,
    objects_per_image: tuple[int, int] = (1, 4),
    crowd_every: int = 4,
    color_jitter: float = 25.0,
    seed: int = 0,
) -> SyntheticDataset:
    """Write a COCO-format instance dataset of planted objects under ``root``.

    Args:
        root: output folder; gets ``images/`` and ``annotations/instances_{train,val}.json``.
        num_train, num_val: images per split (file names ``train_000000.jpg``, ``val_000000.jpg``).
        image_size: ``W`` or ``(W, H)`` in pixels, at least 48.
        shapes: the classes, in category-id order (ids 1..K).
        objects_per_image: inclusive range of objects per image.
        crowd_every: every n-th image (n > 0) also holds a crowd of small discs (one ``iscrowd`` annotation of
            class ``disc``, when ``disc`` is a class); 0: none.
        color_jitter: +- per channel around each class's hue.
        seed: everything depends only on it.
    """
    size = _size(image_size)
    counts = {"train": num_train, "val": num_val}
    _check_args(counts, size, shapes, objects_per_image)
    root = _prepare_root(root)
    (root / "images").mkdir(exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(shapes)]
    w, h = size
    planted: dict[str, list[Planted]] = {}
    files: dict[str, Path] = {}
    ann_id = 1
    for split, n in counts.items():
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        objects: list[Planted] = []
        for i in range(n):
            image_id = len(images) + 1
            name = f"{split}_{i:06d}.jpg"
            crowd = crowd_every > 0 and i % crowd_every == crowd_every - 1
            scene = _scene(rng, size, shapes, objects_per_image, crowd, color_jitter)
            Image.fromarray(scene.pixels).save(root / "images" / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for obj, m in scene.objects:
                if obj.iscrowd:
                    seg: Any = _uncompressed_rle(m)
                else:
                    seg = [list(obj.polygon)] if obj.polygon is not None else compressed_rle(m)
                rle = _as_rle(seg, h, w)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": list(shapes).index(obj.label) + 1,
                        "segmentation": seg,
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": int(obj.iscrowd),
                    }
                )
                objects.append(replace(obj, file_name=name, image_id=image_id))
                ann_id += 1
        coco = {
            "info": {"description": f"densevision planted objects ({split}), seed {seed}", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(coco))
        planted[split], files[split] = objects, path
    return SyntheticDataset(root, tuple(shapes), planted, files, size)


ADE_SPLITS = {"train": "training", "val": "validation"}


def make_ade_dataset(
    root: str | Path,
    *,
    num_train: int = 16,
    num_val: int = 8,
    image_size: int | tuple[int, int] = 128,
    shapes: Sequence[str] = CLASSES,
    background: str | None = "background",
    objects_per_image: tuple[int, int] = (1, 4),
    color_jitter: float = 25.0,
    ignore_edges: bool = True,
    seed: int = 0,
) -> SyntheticDataset:
    """Write an ADE20k-layout semantic segmentation dataset of planted objects under ``root``.

    Label values: 0 = other (a one-pixel ring around each object unless ``ignore_edges`` is False; ignored), then
    the classes 1..K in the order of :attr:`SyntheticDataset.classes`: ``background`` (the texture; None leaves it
    0 = ignored as well), then the shapes. ``objectInfo<K>.txt`` names them as ADE's ``objectInfo150.txt`` does.

    Args:
        root: output folder (the ``ADEChallengeData2016`` level).
        num_train, num_val: images per split (``ADE_train_00000001.jpg`` / ``.png`` ...).
        image_size: ``W`` or ``(W, H)`` in pixels, at least 48.
        shapes: object classes.
        background: name of the texture class, or None.
        objects_per_image: inclusive range of objects per image.
        color_jitter: +- per channel around each class's hue.
        ignore_edges: label the ring around each object 0 (ignored); False labels every pixel with its class.
        seed: everything depends only on it.
    """
    size = _size(image_size)
    counts = {"train": num_train, "val": num_val}
    _check_args(counts, size, shapes, objects_per_image)
    root = _prepare_root(root)
    rng = np.random.default_rng(seed)
    classes = ((background,) if background else ()) + tuple(shapes)
    first_shape = 2 if background else 1
    pixel_count = np.zeros(len(classes) + 1, dtype=np.int64)
    image_count = {split: np.zeros(len(classes) + 1, dtype=np.int64) for split in counts}
    planted: dict[str, list[Planted]] = {}
    files: dict[str, Path] = {}
    for split, n in counts.items():
        img_dir = root / "images" / ADE_SPLITS[split]
        ann_dir = root / "annotations" / ADE_SPLITS[split]
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for i in range(n):
            stem = f"ADE_{split}_{i + 1:08d}"
            scene = _scene(rng, size, shapes, objects_per_image, False, color_jitter)
            label = np.full(scene.pixels.shape[:2], 1 if background else 0, dtype=np.uint8)
            for _, m in scene.objects if ignore_edges else ():
                label[ndimage.binary_dilation(m) & ~m] = 0
            for obj, m in scene.objects:  # objects after rings: a ring never eats an object
                label[m] = first_shape + list(shapes).index(obj.label)
                objects.append(replace(obj, file_name=f"{stem}.jpg", image_id=i + 1))
            Image.fromarray(scene.pixels).save(img_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(label).save(ann_dir / f"{stem}.png")
            values = np.bincount(label.ravel(), minlength=len(classes) + 1)
            pixel_count += values
            image_count[split] += values > 0
        planted[split], files[split] = objects, ann_dir
    write_object_info(root, classes, pixel_count, image_count)
    return SyntheticDataset(root, classes, planted, files, size)


def write_object_info(
    root: Path, classes: Sequence[str], pixel_count: np.ndarray, image_count: dict[str, np.ndarray]
) -> None:
    """``objectInfo<K>.txt`` as ADE's ``objectInfo150.txt``: per class (labels 1..K) its share of the labelled
    pixels and the training / validation images that hold it."""
    ratio = pixel_count / max(1, pixel_count.sum())
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    for k, name in enumerate(classes, start=1):
        rows.append(f"{k}\t{ratio[k]:.4f}\t{image_count['train'][k]}\t{image_count['val'][k]}\t{name}")
    (root / f"objectInfo{len(classes)}.txt").write_text("\n".join(rows) + "\n")
