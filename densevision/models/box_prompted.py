"""A DETR-family detector whose boxes prompt a SAM-style mask head on the same FPN features."""

from __future__ import annotations

from typing import Any

from mmdet.models.detectors.base import BaseDetector
from mmdet.models.detectors.base_detr import DetectionTransformer
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from torch import Tensor

from densevision.errors import ConfigError
from densevision.models.instance_head import SamBoxMaskHead


class BoxPromptedInstanceSegmentor(BaseDetector):
    """Instance segmentation = a DETR-family detector (DINO, DETR, Deformable DETR ...) + :class:`SamBoxMaskHead`.

    The backbone and neck run once; the detector's transformer and head and the mask head both read the neck's
    levels. Training: the detector's own losses plus the mask head's (BCE, dice, IoU) with jittered ground-truth
    boxes as prompts, so mask training does not wait for the detector to find objects. Test: the detector's boxes
    (in input pixels) prompt the mask head; results carry ``bboxes``, ``scores``, ``labels`` and ``masks``
    (N x H x W bool at the original image size), which mmdet's ``CocoMetric(metric=['bbox', 'segm'])`` reads.

    State-dict keys: ``detector.*`` (the detector's own layout under that prefix) and ``mask_head.*``.

    Args:
        detector: config of the detector (any :class:`DetectionTransformer`), without a data preprocessor.
        mask_head: config of the mask head (``SamBoxMaskHead``).
        data_preprocessor: the model's (``DetDataPreprocessor``).
        init_cfg: mmengine init config.
    """

    def __init__(
        self,
        detector: dict[str, Any],
        mask_head: dict[str, Any],
        data_preprocessor: dict[str, Any] | None = None,
        init_cfg: dict[str, Any] | list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.detector = MODELS.build(detector)
        if not isinstance(self.detector, DetectionTransformer):
            raise ConfigError(
                f"BoxPromptedInstanceSegmentor wraps DETR-family detectors; got {type(self.detector).__name__} "
                "(use DINO, DETR, DeformableDETR, ConditionalDETR or DABDETR)"
            )
        self.mask_head: SamBoxMaskHead = MODELS.build(mask_head)

    def extract_feat(self, batch_inputs: Tensor) -> tuple[Tensor, ...]:
        """Backbone + neck of the detector: the levels both heads read."""
        return tuple(self.detector.extract_feat(batch_inputs))

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict[str, Tensor]:
        feats = self.extract_feat(batch_inputs)
        head_inputs = self.detector.forward_transformer(feats, batch_data_samples)
        losses: dict[str, Tensor] = self.detector.bbox_head.loss(**head_inputs, batch_data_samples=batch_data_samples)
        mask_losses = self.mask_head.loss(feats, batch_data_samples)
        if set(losses) & set(mask_losses):
            raise ConfigError(f"detector and mask head both report {sorted(set(losses) & set(mask_losses))}")
        losses.update(mask_losses)
        return losses

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList, rescale: bool = True) -> SampleList:
        feats = self.extract_feat(batch_inputs)
        head_inputs = self.detector.forward_transformer(feats, batch_data_samples)
        # Boxes in input pixels (rescale=False) are the prompts; they are rescaled below as the head would have.
        results = self.detector.bbox_head.predict(**head_inputs, rescale=False, batch_data_samples=batch_data_samples)
        metas = [s.metainfo for s in batch_data_samples]
        masks = self.mask_head.predict(feats, [r.bboxes for r in results], metas, rescale=rescale)
        for result, mask, meta in zip(results, masks, metas, strict=True):
            result.masks = mask
            if rescale:
                result.bboxes = result.bboxes / result.bboxes.new_tensor(meta["scale_factor"]).repeat((1, 2))
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self, batch_inputs: Tensor, batch_data_samples: SampleList | None = None) -> tuple[Any, ...]:
        """The detector head's raw outputs and the mask head's image embedding (no box-dependent part)."""
        feats = self.extract_feat(batch_inputs)
        head_inputs = self.detector.forward_transformer(feats, batch_data_samples)
        det_outputs = self.detector.bbox_head.forward(**head_inputs)
        height, width = batch_inputs.shape[-2:]
        embedding = self.mask_head.image_embedding(feats, (height, width))
        return (*det_outputs, embedding)
