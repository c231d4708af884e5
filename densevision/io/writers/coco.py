"""COCO results JSON (the list ``COCO.loadRes`` / ``COCOeval`` read), streamed one detection at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from pycocotools import mask as mask_utils

from densevision.errors import ConfigError, InvalidRegionError
from densevision.io.atomic import AtomicWriter, disk_errors, jsonable

# pycocotools stores run lengths as 32-bit unsigned integers.
_MAX_RLE_PIXELS = 2**32 - 1


def mask_to_rle(
    mask: np.ndarray, origin: tuple[int, int] = (0, 0), image_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """COCO compressed RLE (``{"size": [H, W], "counts": str}``) of a whole-image mask.

    ``mask`` is ``h x w`` (bool or 0/1) with its top-left at pixel ``origin = (x, y)`` of an image of
    ``image_size = (W, H)`` pixels (default: the mask is the whole image); pixels outside it are 0. Only the crop is
    ever in memory: the run lengths are computed from it and compressed by pycocotools.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise InvalidRegionError(f"a mask must be H x W, got shape {m.shape}")
    h, w = m.shape
    W, H = image_size if image_size is not None else (w, h)
    x0, y0 = origin
    if W * H > _MAX_RLE_PIXELS:
        raise ConfigError(f"COCO RLE cannot describe a {W} x {H} image (over 2^32 pixels); write GeoJSON instead")
    if x0 < 0 or y0 < 0 or x0 + w > W or y0 + h > H:
        raise InvalidRegionError(f"a {w} x {h} mask at {origin} leaves the {W} x {H} image; crop it first")
    if (x0, y0, w, h) == (0, 0, W, H):
        rle = mask_utils.encode(np.asfortranarray(m, dtype=np.uint8))
    else:
        # Column-major runs of the crop, placed in the image: pixel (x, y) has flat index x * H + y.
        edges = np.diff(np.pad(m, ((1, 1), (0, 0))).astype(np.int8), axis=0).T  # w x (h + 1): +1 start, -1 end
        cs, rs = np.nonzero(edges == 1)
        ce, re_ = np.nonzero(edges == -1)
        starts = (x0 + cs).astype(np.int64) * H + y0 + rs
        ends = (x0 + ce).astype(np.int64) * H + y0 + re_
        # A run reaching the bottom of one column and one starting at the top of the next are one run.
        joined = starts[1:] == ends[:-1]
        starts = starts[np.r_[True, ~joined]] if len(starts) else starts
        ends = ends[np.r_[~joined, True]] if len(ends) else ends
        bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
        bounds[0], bounds[-1] = 0, W * H
        bounds[1:-1:2], bounds[2:-1:2] = starts, ends
        rle = mask_utils.frPyObjects({"size": [H, W], "counts": np.diff(bounds).tolist()}, H, W)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class CocoResultsWriter(AtomicWriter):
    """Stream COCO results: a JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
    ``"segmentation"`` (compressed RLE, counts as str) for instance masks.

    ``bbox`` is in pixels of the evaluated image with the pixel-corner convention (``x, y`` = top-left edge).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.count = 0
        try:
            self._file: TextIO = open(self.partial, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        except OSError as e:
            raise self._open_error(e) from e
        self._file.write("[")

    def add(
        self,
        image_id: int,
        category_id: int,
        score: float,
        bbox: Sequence[float] | None = None,
        *,
        mask: np.ndarray | None = None,
        mask_origin: tuple[int, int] = (0, 0),
        image_size: tuple[int, int] | None = None,
        segmentation: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one result. ``mask``: ``h x w`` bool at ``mask_origin = (x, y)`` in an image of
        ``image_size = (W, H)`` (see :func:`mask_to_rle`), or ``segmentation``: an RLE already encoded. Without
        ``bbox``, the box is taken from the mask."""
        self._check_open()
        if mask is not None and segmentation is not None:
            raise ConfigError("pass either mask= or segmentation=, not both")
        rle = dict(segmentation) if segmentation is not None else None
        if mask is not None:
            rle = mask_to_rle(mask, mask_origin, image_size)
        if rle is not None and isinstance(rle.get("counts"), bytes):
            rle["counts"] = rle["counts"].decode("ascii")
        if bbox is None:
            if rle is None:
                raise ConfigError("a COCO result needs a bbox, a mask or a segmentation")
            bbox = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).tolist()
        if len(bbox) != 4:
            raise InvalidRegionError(f"bbox must be [x, y, w, h], got {list(bbox)}")
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "bbox": [float(v) for v in bbox],
            "score": float(score),
        }
        if rle is not None:
            result["segmentation"] = rle
        try:
            text = json.dumps(result, default=jsonable, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"{self.path}: result {self.count} has NaN or infinite values ({e}); drop it") from e
        with disk_errors(self.partial):
            self._file.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def _finish(self) -> None:
        self._file.write("\n]\n")
        self._file.close()

    def _discard(self) -> None:
        self._file.close()


def write_coco_results(path: str | os.PathLike[str], results: Iterable[Mapping[str, Any]]) -> int:
    """Write results given as mappings of :meth:`CocoResultsWriter.add`'s arguments (``image_id``,
    ``category_id``, ``score``, and ``bbox`` and/or ``mask`` ...); ``results`` may be a generator.
    Returns the number written."""
    with CocoResultsWriter(path) as w:
        for r in results:
            w.add(**r)
    return w.count
