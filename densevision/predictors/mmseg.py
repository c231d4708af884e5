"""Any mmsegmentation model built from its config (and checkpoint) as a tile predictor."""

from __future__ import annotations

import os
from typing import Any

import torch

from densevision.errors import ConfigError
from densevision.predictors.base import class_palette, input_channels
from densevision.predictors.build import build_model


class MMSegPredictor:
    """Wraps an mmseg ``EncoderDecoder``: its own data preprocessor normalises, ``encode_decode`` gives logits
    resized to the input. mmseg models are trained on BGR images (loaded with cv2) and convert channels as their
    ``data_preprocessor`` says; tiles arrive RGB, so three-band tiles are flipped to BGR first, as mmseg's own
    loader would have produced them."""

    def __init__(self, model: Any) -> None:  # an mmseg EncoderDecoder
        self.model = model.eval()
        meta = dict(getattr(model, "dataset_meta", None) or {})
        self.num_classes = int(model.decode_head.out_channels)
        classes = meta.get("classes") or [f"class_{i}" for i in range(self.num_classes)]
        if len(classes) != self.num_classes:
            raise ConfigError(
                f"the checkpoint names {len(classes)} classes but the model's head predicts {self.num_classes}"
            )
        self.class_names = tuple(str(c) for c in classes)
        self.palette = class_palette(meta, self.num_classes)
        # Hierarchical backbones (Swin, ConvNeXt, ResNet) reduce by 32: tiles aligned to it keep features aligned.
        self.size_divisor = int(getattr(model.data_preprocessor, "size_divisor", None) or 32)
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
    ) -> MMSegPredictor:
        """Build the model from an mmseg config (a path or a shipped config's name) and load the checkpoint
        (strict, through the safe loader); see :func:`densevision.predictors.build.build_model`."""
        model = build_model(config, checkpoint, scope="mmseg", cfg_options=cfg_options)
        return cls(model.to(device))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` raw pixels, uint8 or float32 (the same values give the same logits: the preprocessor
        converts to float32 first, exactly for uint8) -> ``B x K x H x W`` float32 logits."""
        inputs = batch[:, [2, 1, 0]] if batch.shape[1] == 3 else batch
        inputs = inputs if inputs.is_floating_point() else inputs.float()
        data = self.model.data_preprocessor({"inputs": list(inputs)}, False)
        h, w = batch.shape[-2:]
        metas = [{"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)} for _ in range(len(batch))]
        return self.model.encode_decode(data["inputs"], metas).float()
