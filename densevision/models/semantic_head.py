"""Semantic segmentation with SAM's mask decoder: one learned prompt per class, one mask per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import Tensor, nn

from densevision.models.sam_decoder import FpnFusion, SamPromptDecoder
from densevision.models.sam_weights import check_not_loaded, load_sam_weights


class SamSemanticHead(BaseDecodeHead):
    """mmseg decode head: FPN levels -> one image embedding -> SAM's mask decoder prompted by K class embeddings.

    1. The selected FPN levels (``in_index``, finest first) are fused into one ``channels``-wide embedding at the
       finest selected level's stride (:class:`FpnFusion`). The configs use the stride-8 level: a 512 crop gives a
       64 x 64 grid, SAM's own grid size, and masks at stride 2 after the decoder's 4x upscaling. Stride 4 would
       quadruple the decoder's cost, which is paid once per class prompt (below).
    2. SAM's dense positional encoding is computed over that grid; SAM's no-mask embedding is added.
    3. Each class k has ``tokens_per_class`` learned prompt tokens; each class prompt runs through SAM's
       TwoWayTransformer + MaskDecoder against its own image's embedding and yields one (single-mask-token) mask.
       The prompts of all images run in one pass (:func:`~densevision.models.sam_decoder.predict_masks_batched`).

    Output: logits B x K x 4h x 4w, trained and resized by mmseg's ``BaseDecodeHead`` machinery (``loss_decode``,
    ``ignore_index``, ``align_corners`` ...). Memory: the decoder's activations are K x C x h x w per image (K = 150
    on ADE20k); ``with_cp`` with ``prompt_chunk_size`` recomputes them chunk by chunk in the backward pass.

    Args:
        in_channels: channels of the selected FPN levels (FPN ``out_channels`` each).
        in_index: which neck outputs to fuse, finest first.
        num_classes: classes (mmseg's meaning; ``out_channels`` = number of class prompts).
        channels: embedding / transformer width; 256 to load SAM weights.
        tokens_per_class: learned prompt tokens per class.
        transformer_depth, transformer_mlp_dim, transformer_num_heads: of SAM's TwoWayTransformer (2, 2048, 8).
        prompt_chunk_size: class prompts per decoder pass (None: all).
        with_cp: activation checkpointing per chunk in training.
        sam_checkpoint: an official SAM .pth whose prompt encoder / mask decoder are loaded by ``init_weights``
            (:func:`~densevision.models.sam_weights.load_sam_weights`); the fusion and class embeddings stay
            trained from scratch.
        **kwargs: the rest of ``BaseDecodeHead`` (``loss_decode``, ``ignore_index``, ``align_corners``,
            ``out_channels``, ``threshold``, ``init_cfg``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: Sequence[int],
        *,
        num_classes: int,
        channels: int = 256,
        tokens_per_class: int = 1,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_num_heads: int = 8,
        prompt_chunk_size: int | None = None,
        with_cp: bool = False,
        sam_checkpoint: str | None = None,
        init_cfg: dict[str, Any] | list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            list(in_channels),
            channels,
            num_classes=num_classes,
            in_index=list(in_index),
            input_transform="multiple_select",
            dropout_ratio=0.0,
            init_cfg=init_cfg,
            **kwargs,
        )
        # The class prompts through the mask decoder take the place of mmseg's 1x1 classifier.
        del self.conv_seg
        self.tokens_per_class = tokens_per_class
        self.prompt_chunk_size = prompt_chunk_size
        self.sam_checkpoint = sam_checkpoint
        self.fusion = FpnFusion(in_channels, channels)
        self.class_embed = nn.Embedding(self.out_channels * tokens_per_class, channels)
        self.decoder = SamPromptDecoder(
            embed_dim=channels,
            depth=transformer_depth,
            mlp_dim=transformer_mlp_dim,
            num_heads=transformer_num_heads,
            with_cp=with_cp,
        )

    def init_weights(self) -> None:
        super().init_weights()
        if self.sam_checkpoint is not None:
            not_loaded = load_sam_weights(self, self.sam_checkpoint)
            check_not_loaded(not_loaded, ("fusion.", "class_embed."), type(self).__name__)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """``inputs``: the neck's levels -> class logits B x K x 4h x 4w (h x w: the finest selected level)."""
        emb = self.fusion(self._transform_inputs(inputs))
        b, k = emb.shape[0], self.out_channels
        prompts = self.class_embed.weight.reshape(k, self.tokens_per_class, -1)
        sparse = prompts.repeat(b, 1, 1)  # (B*K) x T x C, image-major
        batch_index = torch.arange(b, device=emb.device).repeat_interleave(k)
        masks, _ = self.decoder(emb, sparse, batch_index, chunk_size=self.prompt_chunk_size)
        return masks.reshape(b, k, *masks.shape[-2:])
