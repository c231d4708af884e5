"""What the engine needs from a model: raw pixels of a batch of tiles in, per-pixel class logits (segmentation) or
per-tile detections out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


def class_palette(meta: dict[str, Any], k: int) -> tuple[tuple[int, int, int], ...]:
    """``k`` RGB colours: the dataset meta's ``palette`` when it has enough, else fixed pseudo-random ones."""
    palette = meta.get("palette") or []
    if len(palette) >= k:
        return tuple(tuple(int(v) for v in c[:3]) for c in palette[:k])  # type: ignore[misc]
    rng = torch.Generator().manual_seed(k)
    return tuple(tuple(int(v) for v in torch.randint(0, 256, (3,), generator=rng)) for _ in range(k))  # type: ignore[misc]


def input_channels(model: Any) -> int | None:
    """The channels a built model takes: the length of its ``data_preprocessor``'s mean (None when it has none)."""
    mean = getattr(getattr(model, "data_preprocessor", None), "mean", None)
    return int(mean.numel()) if isinstance(mean, torch.Tensor) else None


@runtime_checkable
class SegmentationPredictor(Protocol):
    """A segmentation model adapted to tiles.

    ``__call__`` takes ``B x C x H x W`` float32 raw pixel values (RGB order for slides, the selected bands for
    rasters) on ``device`` and returns ``B x K x H x W`` float32 logits at the same size, on ``device`` (the engine
    blends them there). ``H`` and ``W`` are multiples of ``size_divisor``. The engine converts uint8 tiles to
    float32 on the device before the call; the mmseg and mmdet predictors also take uint8 batches directly.
    """

    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    size_divisor: int
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class TileDetections:
    """One tile's detections in tile pixels (working resolution, origin at the tile's top-left corner).

    ``boxes`` N x 4 float64 (x0, y0, x1, y1, pixel edges); ``scores`` N float64 in [0, 1]; ``labels`` N int64 class
    indexes; ``masks`` N x T x T bool, or None when the model has no mask head.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)


@runtime_checkable
class DetectionPredictor(Protocol):
    """A detection (or instance segmentation) model adapted to tiles.

    ``__call__`` takes ``B x C x H x W`` float32 raw pixel values (as for :class:`SegmentationPredictor`) on
    ``device`` and returns one :class:`TileDetections` per tile, on the host, already filtered by the predictor's
    score threshold. ``has_masks`` says whether they carry masks.
    """

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    size_divisor: int
    device: torch.device
    has_masks: bool

    def __call__(self, batch: torch.Tensor) -> list[TileDetections]: ...
