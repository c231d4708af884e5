"""Any mmdetection detector (boxes, and masks where it has a mask head) built from its config as a tile predictor."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from densevision.errors import ConfigError
from densevision.predictors.base import TileDetections, class_palette, input_channels
from densevision.predictors.build import build_model


def _num_classes(model: Any) -> int | None:
    """The class count of the detector's head(s), as the config set it."""
    for head in ("bbox_head", "roi_head"):
        h = getattr(model, head, None)
        if h is None:
            continue
        if head == "roi_head":
            h = getattr(h, "bbox_head", None)
        n = getattr(h, "num_classes", None)
        if isinstance(n, int):
            return n
    return None


class MMDetPredictor:
    """Wraps an mmdet detector: tiles in, boxes / scores / labels (/ masks) per tile out, in tile pixels.

    Tiles are fed at their own size (the engine picks the resolution with ``--level`` / ``--mpp``), flipped to BGR
    for three-band images as mmdet's loader would have produced them; the detector's ``data_preprocessor``
    normalises and pads as in training. Detections scoring below ``score_threshold`` are dropped here, before
    anything is copied off the device.
    """

    def __init__(self, model: Any, *, score_threshold: float = 0.3) -> None:  # an mmdet BaseDetector
        if not 0 <= score_threshold <= 1:
            raise ConfigError(f"score threshold must be in [0, 1], got {score_threshold}")
        self.model = model.eval()
        self.score_threshold = float(score_threshold)
        meta = dict(getattr(model, "dataset_meta", None) or {})
        k = _num_classes(model)
        classes = list(meta.get("classes") or [])
        if k is not None and len(classes) != k:
            if classes:
                raise ConfigError(
                    f"the checkpoint (or the config's dataset) names {len(classes)} classes but the model's head "
                    f"predicts {k}; use the config the checkpoint was trained with"
                )
            classes = [f"class_{i}" for i in range(k)]
        self.class_names = tuple(str(c) for c in classes)
        self.palette = class_palette(meta, len(self.class_names))
        self.size_divisor = max(1, int(getattr(model.data_preprocessor, "pad_size_divisor", 1) or 1))
        self.has_masks = bool(getattr(model, "with_mask", False)) or hasattr(model, "mask_head")
        self.device = next(model.parameters()).device
        self.in_channels = input_channels(model)  # checked against the bands fed

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str],
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        cfg_options: dict[str, Any] | None = None,
        score_threshold: float = 0.3,
    ) -> MMDetPredictor:
        """Build the detector from an mmdet config (a path or a shipped config's name) and load the checkpoint
        (strict, through the safe loader); see :func:`densevision.predictors.build.build_model`. Class names come
        from the checkpoint's ``dataset_meta``; without one, from the config."""
        model = build_model(config, checkpoint, scope="mmdet", cfg_options=cfg_options)
        return cls(model.to(device), score_threshold=score_threshold)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> list[TileDetections]:
        from mmdet.structures import DetDataSample

        inputs = batch[:, [2, 1, 0]] if batch.shape[1] == 3 else batch
        inputs = inputs if inputs.is_floating_point() else inputs.float()  # uint8: the same values, exactly
        h, w = batch.shape[-2:]
        meta = {"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}
        samples = [DetDataSample(metainfo=meta) for _ in range(len(batch))]
        data = self.model.data_preprocessor({"inputs": list(inputs), "data_samples": samples}, False)
        results = self.model.predict(data["inputs"], data["data_samples"], rescale=True)
        kept = [r.pred_instances[r.pred_instances.scores >= self.score_threshold] for r in results]
        return host_detections(kept, with_masks=self.has_masks)


def host_detections(instances: Sequence[Any], *, with_masks: bool) -> list[TileDetections]:
    """Each tile's kept detections (mmengine ``InstanceData``: bboxes, scores, labels, masks) as TileDetections.

    The batch is packed where it was computed, one table of boxes, score and label (float64, exact for labels) and
    one stack of masks, and crosses to the host in those two copies and one wait instead of four copies per tile."""
    table = torch.cat(
        [torch.cat([p.bboxes.reshape(-1, 4).double(), p.scores[:, None].double(), p.labels[:, None].double()], 1)
         for p in instances]
    )  # fmt: skip
    with_masks = with_masks and all("masks" in p for p in instances)
    masks = torch.cat([p.masks.bool() for p in instances]) if with_masks else None
    host = to_host([table] if masks is None else [table, masks])
    split = np.cumsum([len(p) for p in instances])[:-1]
    boxes, scores = np.split(np.ascontiguousarray(host[0][:, :4]), split), np.split(host[0][:, 4].copy(), split)
    labels = np.split(host[0][:, 5].astype(np.int64), split)
    tile_masks = np.split(host[1], split) if masks is not None else [None] * len(instances)
    return [TileDetections(*d) for d in zip(boxes, scores, labels, tile_masks, strict=True)]


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """``tensors`` as host arrays; from a GPU through pinned memory, all copies queued before the one wait."""
    if not any(t.is_cuda for t in tensors):
        return [t.cpu().numpy() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors, strict=True):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.numpy() for h in host]
