"""Any mmsegmentation model built from its config (and checkpoint) as a tile predictor."""

from __future__ import annotations

import os
from typing import Any

import torch

from densevision.compat import patch_mmengine
from densevision.errors import CheckpointError, ConfigError
from densevision.predictors.base import class_palette
from densevision.predictors.weights import load_weights


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

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str],
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        cfg_options: dict[str, Any] | None = None,
    ) -> MMSegPredictor:
        """Build the model from an mmseg config file and load the checkpoint (strict, through the safe loader)."""
        from mmengine.config import Config
        from mmseg.apis import init_model

        if not os.path.isfile(config):
            raise ConfigError(f"{config}: no such config file; pass an mmsegmentation config with -c")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise CheckpointError(f"{checkpoint}: no such checkpoint file; check the -w path")
        patch_mmengine()
        cfg = Config.fromfile(os.fspath(config))
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
        model = init_model(cfg, None, device="cpu")
        if checkpoint is not None:
            model.dataset_meta = load_weights(model, checkpoint) or None
        else:  # the config's initialisation, as training starts (init_model leaves some tensors uninitialised)
            model.init_weights()
        return cls(model.to(device))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, [2, 1, 0]] if batch.shape[1] == 3 else batch
        data = self.model.data_preprocessor({"inputs": list(inputs)}, False)
        h, w = batch.shape[-2:]
        metas = [{"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w)} for _ in range(len(batch))]
        return self.model.encode_decode(data["inputs"], metas).float()
