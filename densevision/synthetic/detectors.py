"""Models whose right answer is known, for tests and benchmarks: a detector of connected blobs of given colours (one
class per colour) and a box-prompted mask model that returns the pixels of those colours inside each box."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from densevision.predictors.base import TileDetections


class ColourDetector:
    """Finds connected regions whose pixels are within ``tolerance`` of a class colour (per band), and reports each
    as one detection: its tight box in tile pixels, score 0.9, and its mask when ``masks``. The classic stand-in
    for a perfectly trained detector of planted objects."""

    size_divisor = 1
    device = torch.device("cpu")

    def __init__(
        self,
        colours: dict[str, tuple[int, ...]],
        *,
        tolerance: int = 0,
        masks: bool = False,
        min_pixels: int = 4,
        fail_after: int | None = None,
    ) -> None:
        self.class_names = tuple(colours)
        self.colours = [np.array(c, dtype=np.float32) for c in colours.values()]
        self.palette = tuple(tuple(int(v) for v in c[:3]) for c in colours.values())
        self.tolerance, self.has_masks, self.min_pixels = tolerance, masks, min_pixels
        self.fail_after, self.calls = fail_after, 0

    def __call__(self, batch: torch.Tensor) -> list[TileDetections]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        out = []
        for chw in batch.cpu().numpy():
            hwc = chw.transpose(1, 2, 0)
            boxes, labels, masks = [], [], []
            for label, colour in enumerate(self.colours):
                hit = (np.abs(hwc - colour) <= self.tolerance).all(axis=-1)
                blobs, _ = ndimage.label(hit)
                for k, sl in enumerate(ndimage.find_objects(blobs), start=1):
                    if sl is None:
                        continue
                    mask = blobs == k
                    if mask.sum() < self.min_pixels:
                        continue
                    boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                    labels.append(label)
                    masks.append(mask)
            n = len(boxes)
            out.append(
                TileDetections(
                    boxes=np.array(boxes, dtype=np.float64).reshape(n, 4),
                    scores=np.full(n, 0.9),
                    labels=np.array(labels, dtype=np.int64),
                    masks=np.array(masks, dtype=bool).reshape(n, *hwc.shape[:2]) if self.has_masks else None,
                )
            )
        return out


class ColourSam:
    """A box-prompted mask model whose right answer is known: inside each box, the pixels of any class colour."""

    def __init__(self, colours: dict[str, tuple[int, ...]], *, tolerance: int = 0) -> None:
        self.colours = [np.array(c, dtype=np.int16) for c in colours.values()]
        self.tolerance = tolerance
        self.windows: list[tuple[int, int]] = []

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.windows.append(image.shape[:2])
        hit = np.zeros(image.shape[:2], dtype=bool)
        for colour in self.colours:
            hit |= (np.abs(image.astype(np.int16) - colour[:3]) <= self.tolerance).all(axis=-1)
        masks = np.zeros((len(boxes), *image.shape[:2]), dtype=bool)
        for m, (x0, y0, x1, y1) in zip(masks, np.round(boxes).astype(int), strict=True):
            m[y0:y1, x0:x1] = hit[y0:y1, x0:x1]
        return masks, np.full(len(boxes), 0.95, dtype=np.float32)
