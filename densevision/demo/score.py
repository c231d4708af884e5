"""Scores of the demo's outputs against the planted truth.

- Segmentation: the confusion matrix of the stitched class map against the planted masks at level 0, read window
  by window (never the whole image), and from it per-class IoU ``TP / (TP + FP + FN)``. Pixels the engine skipped
  as empty (nodata in the class map) count as background predictions.
- Detection: detections matched greedily, best score first, to the unmatched planted object of the same class
  with the highest box IoU, if at least ``iou``; precision ``TP / detections``, recall ``TP / objects``, F1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from densevision.io import open_image
from densevision.synthetic.planted import Planted

# Window side for reading the class map: memory is a few times WINDOW^2 bytes.
WINDOW = 2048


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def segmentation_scores(
    class_map: str | Path, objects: Sequence[Planted], classes: Sequence[str], *, nodata: int = 255
) -> dict[str, Any]:
    """Per-class IoU of a level-0 class map (class ``i`` = ``classes[i]``, ``classes[0]`` the background that
    holds no object) against the planted objects (``label`` = class name).

    Returns:
        ``iou`` per class, ``mean_iou_objects`` (over the object classes), ``pixel_accuracy``, ``nodata_pixels``
        and the ``confusion`` matrix (rows: truth, columns: prediction).
    """
    k = len(classes)
    index = {name: i for i, name in enumerate(classes)}
    confusion = np.zeros((k, k), dtype=np.int64)
    skipped = 0
    with open_image(class_map) as src:
        width, height = src.size
        for y in range(0, height, WINDOW):
            h = min(WINDOW, height - y)
            meeting_rows = [o for o in objects if o.y0 < y + h and o.y1 > y]
            for x in range(0, width, WINDOW):
                w = min(WINDOW, width - x)
                pred = src.read_region((x, y), 0, (w, h)).pixels[..., 0].astype(np.int64)
                empty = pred == nodata
                skipped += int(empty.sum())
                pred[empty] = 0
                truth = np.zeros((h, w), dtype=np.int64)
                for o in meeting_rows:
                    if o.x0 < x + w and o.x1 > x:
                        truth[o.mask(x, y, w, h)] = index[o.label]
                confusion += np.bincount((truth * k + np.minimum(pred, k - 1)).ravel(), minlength=k * k).reshape(k, k)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = {name: _ratio(float(tp[i]), float(union[i])) for i, name in enumerate(classes)}
    object_ious = [v for name, v in iou.items() if name != classes[0] and v is not None]
    return {
        "iou": iou,
        "mean_iou_objects": float(np.mean(object_ious)) if object_ious else None,
        "pixel_accuracy": _ratio(float(tp.sum()), float(confusion.sum())),
        "nodata_pixels": skipped,
        "confusion": confusion.tolist(),
    }


def _prf(tp: int, n_det: int, n_true: int) -> dict[str, Any]:
    p, r = _ratio(tp, n_det), _ratio(tp, n_true)
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else 0.0 if n_det or n_true else None
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "detections": n_det, "objects": n_true}


def detection_scores(
    coco_results: str | Path, objects: Sequence[Planted], classes: Sequence[str], *, iou: float = 0.5
) -> dict[str, Any]:
    """Precision, recall and F1 at box IoU >= ``iou`` of COCO results (level-0 pixels, ``category_id`` = index
    into ``classes``) against the planted objects, overall and per class."""
    dets = json.loads(Path(coco_results).read_text())
    dets.sort(key=lambda d: -float(d["score"]))
    index = {name: i for i, name in enumerate(classes)}
    truth = torch.tensor([o.box for o in objects], dtype=torch.float64).reshape(-1, 4)
    truth_class = np.array([index[o.label] for o in objects], dtype=np.int64)
    matched = np.zeros(len(objects), dtype=bool)
    tp = np.zeros(len(classes), dtype=np.int64)
    n_det = np.zeros(len(classes), dtype=np.int64)
    for d in dets:
        c = int(d["category_id"])
        x, y, w, h = (float(v) for v in d["bbox"])
        n_det[c] += 1
        candidates = np.flatnonzero((truth_class == c) & ~matched)
        if not len(candidates):
            continue
        overlaps = box_iou(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64), truth[candidates])[0].numpy()
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou:
            matched[candidates[best]] = True
            tp[c] += 1
    n_true = np.bincount(truth_class, minlength=len(classes))
    return {
        "iou_threshold": iou,
        **_prf(int(tp.sum()), int(n_det.sum()), len(objects)),
        "per_class": {name: _prf(int(tp[i]), int(n_det[i]), int(n_true[i])) for i, name in enumerate(classes)},
    }
