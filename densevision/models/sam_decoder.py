"""Segment Anything's prompt encoder and mask decoder fed by an FPN image embedding, batched over images.

The modules are segment_anything's own (``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) at SAM's sizes,
so the ``prompt_encoder.*`` / ``mask_decoder.*`` weights of an official checkpoint load unchanged
(:func:`densevision.models.sam_weights.load_sam_weights`). Two things differ from SAM's own call path:

- SAM assumes one image per call: ``MaskDecoder.predict_masks`` repeats the image embedding once per prompt of
  *the* image. :func:`predict_masks_batched` instead pairs each prompt with its own image's embedding
  (``batch_index``), so the prompts of a whole batch run in one pass.
- SAM fixes the embedding grid to 64 x 64 over a 1024 x 1024 input. Here the grid is whatever the FPN gives, and
  the dense positional encoding and box coordinates are normalised over the input extent that grid covers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class FpnFusion(nn.Module):
    """Fuses FPN levels into one image embedding at the stride of the first (finest) level.

    Each level is projected by a 1x1 conv, the coarser ones are upsampled bilinearly to the finest and summed, then
    LayerNorm2d -> 3x3 conv -> LayerNorm2d, the way SAM's image encoder ends its neck (conv 1x1, LN, conv 3x3, LN),
    so the mask decoder sees an embedding normalised as SAM's is.

    Args:
        in_channels: channels of each input level, finest first.
        embed_dim: channels of the embedding (256 for SAM's decoder).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 256) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("FpnFusion needs at least one input level")
        self.lateral = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1, bias=False) for c in in_channels)
        self.norm = LayerNorm2d(embed_dim)
        self.out = nn.Sequential(
            nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1, bias=False), LayerNorm2d(embed_dim)
        )

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """``feats``: B x C_i x H_i x W_i, finest first -> B x embed_dim x H_0 x W_0."""
        if len(feats) != len(self.lateral):
            raise ValueError(f"FpnFusion was built for {len(self.lateral)} levels, got {len(feats)}")
        size = feats[0].shape[-2:]
        x = self.lateral[0](feats[0])
        for conv, f in zip(self.lateral[1:], feats[1:], strict=True):
            x = x + F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
        return self.out(self.norm(x))


def predict_masks_batched(
    decoder: MaskDecoder,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse_prompt_embeddings: Tensor,
    batch_index: Tensor,
    mask_slice: slice = slice(None),
) -> tuple[Tensor, Tensor]:
    """``MaskDecoder.predict_masks`` for prompts of several images in one pass.

    SAM's version computes ``repeat_interleave(image_embeddings, num_prompts)``, which is right only for one image.
    Here prompt ``n`` attends to ``image_embeddings[batch_index[n]]``; the computation per prompt is otherwise the
    same, with the same modules and weights (checked against SAM's own per image in the tests).

    Args:
        decoder: SAM's mask decoder (its transformer, tokens, upscaling and MLPs are used as they are).
        image_embeddings: B x C x h x w, the dense prompt embedding (no-mask embedding) already added.
        image_pe: 1 x C x h x w dense positional encoding.
        sparse_prompt_embeddings: N x T x C prompt tokens.
        batch_index: N image indices in [0, B).
        mask_slice: which of the ``num_mask_tokens`` masks to compute (SAM's ``multimask_output`` selection); the
            others' hypernetwork products are skipped, not computed and dropped.

    Returns:
        masks N x M x 4h x 4w (logits) and IoU predictions N x M, M the number of masks in ``mask_slice``.
    """
    n = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), dim=1)
    src = image_embeddings.index_select(0, batch_index)
    pos_src = image_pe.expand(n, -1, -1, -1)
    _, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]

    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    selected = range(decoder.num_mask_tokens)[mask_slice]
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in selected], dim=1)
    _, cu, hu, wu = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(n, cu, hu * wu)).reshape(n, len(selected), hu, wu)
    iou_pred = decoder.iou_prediction_head(iou_token_out)[:, mask_slice]
    return masks, iou_pred


class SamPromptDecoder(nn.Module):
    """SAM's ``PromptEncoder`` + ``MaskDecoder(TwoWayTransformer)`` over an image embedding of any size.

    The defaults are those of ``segment_anything.build_sam`` (identical for vit_b / vit_l / vit_h), so the official
    ``prompt_encoder.*`` and ``mask_decoder.*`` weights load into ``self.prompt_encoder`` / ``self.mask_decoder``.
    Of the prompt encoder, the positional encoding, the two box-corner embeddings and the no-mask embedding are used;
    point and mask prompts are not (their weights are kept so the checkpoint loads strictly).

    Args:
        embed_dim: transformer / prompt embedding channels (SAM: 256).
        depth, mlp_dim, num_heads: of the TwoWayTransformer (SAM: 2, 2048, 8).
        num_multimask_outputs: SAM's 3 ambiguity masks (the single-mask token is always there too).
        iou_head_depth, iou_head_hidden_dim: of the IoU prediction MLP (SAM: 3, 256).
        mask_in_chans: hidden channels of the (unused) mask-prompt encoder (SAM: 16).
        with_cp: in training, recompute each chunk of prompts in the backward pass instead of keeping its
            activations (torch.utils.checkpoint): memory of one chunk instead of all prompts, for ~1/3 more compute.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        depth: int = 2,
        mlp_dim: int = 2048,
        num_heads: int = 8,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        mask_in_chans: int = 16,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.with_cp = with_cp
        # image_embedding_size / input_image_size are SAM's nominal 64x64 / 1024x1024; they only size the (unused)
        # mask-prompt input. The encodings used here take the actual sizes (dense_pe, embed_boxes).
        self.prompt_encoder = PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=mask_in_chans,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=embed_dim,
            transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
            num_multimask_outputs=num_multimask_outputs,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )

    def dense_pe(self, size: tuple[int, int]) -> Tensor:
        """SAM's dense positional encoding over an h x w embedding grid: 1 x C x h x w."""
        return self.prompt_encoder.pe_layer(size).unsqueeze(0)

    def embed_boxes(self, boxes: Tensor, input_size: tuple[int, int]) -> Tensor:
        """``PromptEncoder._embed_boxes`` with the actual input extent instead of SAM's fixed 1024 x 1024.

        Args:
            boxes: N x 4 (x1, y1, x2, y2) in input pixels.
            input_size: (H, W) of the input extent that the embedding grid covers.

        Returns:
            N x 2 x C corner tokens.
        """
        pe = self.prompt_encoder
        coords = (boxes + 0.5).reshape(-1, 2, 2)  # pixel centres, as SAM
        corners = pe.pe_layer.forward_with_coords(coords, input_size)
        corner_embed = torch.cat([pe.point_embeddings[2].weight, pe.point_embeddings[3].weight], dim=0)
        return corners + corner_embed.to(corners.dtype)

    def forward(
        self,
        image_embeddings: Tensor,
        sparse_prompt_embeddings: Tensor,
        batch_index: Tensor,
        multimask_output: bool = False,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Masks for N prompts over B images.

        Args:
            image_embeddings: B x C x h x w.
            sparse_prompt_embeddings: N x T x C.
            batch_index: N image indices (long).
            multimask_output: SAM's 3 ambiguity masks instead of the single mask.
            chunk_size: prompts per pass (None: all at once); bounds the N x C x h x w activations.

        Returns:
            mask logits N x M x 4h x 4w and IoU predictions N x M (M = 3 or 1).
        """
        _, _, h, w = image_embeddings.shape
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = image_embeddings + dense  # the same for every prompt of an image: added once per image
        pe = self.dense_pe((h, w)).to(src.dtype)
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        n = sparse_prompt_embeddings.shape[0]
        step = n if not chunk_size or chunk_size >= n else chunk_size
        if step == 0:  # no prompts at all: still run, so the graph (and DDP) sees every parameter
            step = 1
        masks, ious = [], []
        for start in range(0, max(n, 1), step):
            args = (src, pe, sparse_prompt_embeddings[start : start + step], batch_index[start : start + step])
            if self.with_cp and self.training and torch.is_grad_enabled():
                m, i = checkpoint(self._decode, *args, mask_slice, use_reentrant=False)
            else:
                m, i = self._decode(*args, mask_slice)
            masks.append(m)
            ious.append(i)
        return torch.cat(masks), torch.cat(ious)

    def _decode(
        self, src: Tensor, pe: Tensor, sparse: Tensor, batch_index: Tensor, mask_slice: slice
    ) -> tuple[Tensor, Tensor]:
        return predict_masks_batched(self.mask_decoder, src, pe, sparse, batch_index, mask_slice)
