"""Modules for the OpenMMLab registries: SAM-style mask heads on FPN features.

This file is the one place where densevision's modules enter mmseg's and mmdet's ``MODELS`` registries; configs
import it with ``custom_imports = dict(imports=["densevision.models"], allow_failed_imports=False)``. Registration
uses ``force=True``, so importing (or reloading) it again replaces the entries instead of raising.

=============================  ==================  ==================================================
type                           registry            what
=============================  ==================  ==================================================
SamSemanticHead                mmseg MODELS        decode head: class prompts -> one mask per class
SamBoxMaskHead                 mmdet MODELS        box-prompted mask head on a detector's neck
BoxPromptedInstanceSegmentor   mmdet MODELS        DETR-family detector + SamBoxMaskHead
=============================  ==================  ==================================================
"""

from __future__ import annotations

from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

from densevision.models.box_prompted import BoxPromptedInstanceSegmentor
from densevision.models.instance_head import SamBoxMaskHead, jitter_boxes
from densevision.models.sam_decoder import FpnFusion, SamPromptDecoder, predict_masks_batched
from densevision.models.sam_weights import load_sam_weights
from densevision.models.semantic_head import SamSemanticHead

MMSEG_MODELS.register_module(module=SamSemanticHead, force=True)
MMDET_MODELS.register_module(module=SamBoxMaskHead, force=True)
MMDET_MODELS.register_module(module=BoxPromptedInstanceSegmentor, force=True)

__all__ = [
    "BoxPromptedInstanceSegmentor",
    "FpnFusion",
    "SamBoxMaskHead",
    "SamPromptDecoder",
    "SamSemanticHead",
    "jitter_boxes",
    "load_sam_weights",
    "predict_masks_batched",
]
