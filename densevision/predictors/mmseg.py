"""Any mmsegmentation model built from its config (and checkpoint) as a tile predictor."""

from __future__ import annotations

import os
from typing import Any

import torch

from densevision.errors import ConfigError
from densevision.predictors.base import class_palette, input_channels
from densevision.predictors.build import build_model


class MMSegPredictor:
    """Wraps an mmseg ``EncoderDecoder``: ``encode_decode`` gives logits resized to the input, fed what its
    ``data_preprocessor`` would give it. mmseg models are trained on BGR images (loaded with cv2) and convert
    channels as their preprocessor says; tiles arrive RGB, as if flipped from BGR. The two flips fold into one
    channel order (RGB when the preprocessor converts BGR to RGB, else BGR), applied with the conversion to float32
    and the normalisation in one step on the whole batch on its device (:meth:`model_input`): the same values as the
    preprocessor's image-by-image list, to the bit."""

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
        pre = model.data_preprocessor
        self._order = [2, 1, 0] if self.in_channels == 3 and not pre.channel_conversion else None
        # Test-time padding to a fixed size (the tiles are multiples of size_divisor already) is the preprocessor's.
        self._own_step = not (pre.test_cfg or {}).get("size")

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

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` RGB raw pixels (uint8 or float32) as the model's float32 input, on their device."""
        pre = self.model.data_preprocessor
        if not self._own_step:
            inputs = batch[:, [2, 1, 0]] if batch.shape[1] == 3 else batch
            return pre({"inputs": list(inputs.float())}, False)["inputs"]
        x = (batch[:, self._order] if self._order and batch.shape[1] == 3 else batch).float()
        return (x - pre.mean) / pre.std if pre._enable_normalize else x

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` raw pixels, uint8 or float32 (the same values give the same logits: converted to float32
        first, exactly for uint8) -> ``B x K x H x W`` float32 logits."""
        h, w = batch.shape[-2:]
        metas = [{"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)} for _ in range(len(batch))]
        return self.model.encode_decode(self.model_input(batch), metas).float()
