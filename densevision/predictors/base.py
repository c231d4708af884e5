"""What the engine needs from a model: raw pixels of a batch of tiles in, per-pixel class logits out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SegmentationPredictor(Protocol):
    """A segmentation model adapted to tiles.

    ``__call__`` takes ``B x C x H x W`` float32 raw pixel values (RGB order for slides, the selected bands for
    rasters) on ``device`` and returns ``B x K x H x W`` float32 logits at the same size. ``H`` and ``W`` are
    multiples of ``size_divisor``.
    """

    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    size_divisor: int
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...
