"""Instance masks from SAM's mask decoder prompted with boxes, on a detector's FPN features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.models.losses.dice_loss import dice_loss
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import get_box_tensor
from torch import Tensor, nn

from densevision.errors import ConfigError
from densevision.models.sam_decoder import FpnFusion, SamPromptDecoder
from densevision.models.sam_weights import check_not_loaded, load_sam_weights


def jitter_boxes(boxes: Tensor, scale: float, max_offset: float, image_size: tuple[int, int]) -> Tensor:
    """SAM's box-prompt noise: each coordinate moves by ``N(0, (scale * side)^2)`` pixels, ``side`` the box's
    width (x) or height (y), clamped to ``+-max_offset``; the result is clipped to the image and its corners
    re-ordered so that x1 <= x2, y1 <= y2.

    Args:
        boxes: N x 4 (x1, y1, x2, y2) in pixels.
        scale: noise std as a fraction of the side (SAM: 0.1).
        max_offset: largest shift in pixels (SAM: 20).
        image_size: (H, W) to clip to.
    """
    if boxes.numel() == 0 or scale <= 0:
        return boxes.clone()
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # w, h, w, h
    noise = (torch.randn_like(boxes) * scale * side).clamp(-max_offset, max_offset)
    moved = boxes + noise
    h, w = image_size
    x = moved[:, 0::2].clamp(0, w)
    y = moved[:, 1::2].clamp(0, h)
    return torch.stack([x.amin(1), y.amin(1), x.amax(1), y.amax(1)], dim=1)


class SamBoxMaskHead(nn.Module):
    """Box-prompted instance masks: FPN levels -> one image embedding -> SAM's mask decoder, one mask per box.

    The selected levels are fused at the finest one's stride ``s`` (:class:`FpnFusion`; the config uses s = 8:
    masks come out at stride s / 4 = 2, twice SAM's mask resolution, at a quarter of stride 4's decoder cost per
    prompt). The embedding grid h x w covers ``(h * s) x (w * s)`` input pixels; SAM's dense positional encoding and
    the box-corner encodings are both normalised over that extent, so they agree.

    Training: up to ``max_prompts_per_image`` ground-truth boxes per image, jittered as SAM does, prompt the decoder;
    the targets are ``gt_instances.masks`` area-averaged to the mask resolution. Losses: BCE and dice on the single
    mask, and SAM's IoU-prediction MSE against the mask's actual IoU. Test: each given box prompts one mask, upsampled
    to the input, cropped to the image and (with ``rescale``) resized to the original image: N x H x W bool.

    Args:
        in_channels: channels of the fused levels (the neck's ``out_channels``), finest first.
        featmap_strides: their strides; checked against the feature maps' sizes.
        in_index: which neck outputs those are (default: the first ``len(in_channels)``).
        embed_dim: embedding / transformer width; 256 to load SAM weights.
        transformer_depth, transformer_mlp_dim, transformer_num_heads: of SAM's TwoWayTransformer (2, 2048, 8).
        box_jitter, box_jitter_max: :func:`jitter_boxes` ``scale`` / ``max_offset`` in training.
        max_prompts_per_image: ground-truth instances sampled per image in training (bounds memory).
        loss_bce_weight, loss_dice_weight, loss_iou_weight: loss weights.
        mask_threshold: logit threshold of the binary masks.
        prompt_chunk_size: prompts per decoder pass (None: all).
        with_cp: activation checkpointing per chunk in training.
        sam_checkpoint: an official SAM .pth loaded into the decoder by ``init_weights``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        featmap_strides: Sequence[int],
        in_index: Sequence[int] | None = None,
        embed_dim: int = 256,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_num_heads: int = 8,
        box_jitter: float = 0.1,
        box_jitter_max: float = 20.0,
        max_prompts_per_image: int = 16,
        loss_bce_weight: float = 5.0,
        loss_dice_weight: float = 5.0,
        loss_iou_weight: float = 1.0,
        mask_threshold: float = 0.0,
        prompt_chunk_size: int | None = 64,
        with_cp: bool = False,
        sam_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        in_index = tuple(range(len(in_channels))) if in_index is None else tuple(in_index)
        if not (len(in_channels) == len(featmap_strides) == len(in_index)):
            raise ConfigError(
                f"mask head: in_channels {list(in_channels)}, featmap_strides {list(featmap_strides)} and in_index "
                f"{list(in_index)} must have one entry per fused level"
            )
        if list(featmap_strides) != sorted(set(featmap_strides)) or featmap_strides[0] < 4:
            raise ConfigError(
                f"mask head: featmap_strides {list(featmap_strides)} must increase from the finest level (>= 4)"
            )
        self.in_index = in_index
        self.featmap_strides = tuple(featmap_strides)
        self.box_jitter = box_jitter
        self.box_jitter_max = box_jitter_max
        self.max_prompts_per_image = max_prompts_per_image
        self.loss_bce_weight = loss_bce_weight
        self.loss_dice_weight = loss_dice_weight
        self.loss_iou_weight = loss_iou_weight
        self.mask_threshold = mask_threshold
        self.prompt_chunk_size = prompt_chunk_size
        self.sam_checkpoint = sam_checkpoint
        self.fusion = FpnFusion(in_channels, embed_dim)
        self.decoder = SamPromptDecoder(
            embed_dim=embed_dim,
            depth=transformer_depth,
            mlp_dim=transformer_mlp_dim,
            num_heads=transformer_num_heads,
            with_cp=with_cp,
        )

    def init_weights(self) -> None:
        """Called by mmengine's ``init_weights`` of the model: loads ``sam_checkpoint`` if one is set."""
        if self.sam_checkpoint is not None:
            not_loaded = load_sam_weights(self, self.sam_checkpoint)
            check_not_loaded(not_loaded, ("fusion.",), type(self).__name__)

    def image_embedding(self, feats: Sequence[Tensor], input_size: tuple[int, int]) -> Tensor:
        """The neck's levels for a batch input of ``input_size`` (H, W) -> B x C x h x w at the finest stride."""
        selected = [feats[i] for i in self.in_index]
        height, width = input_size
        for f, s in zip(selected, self.featmap_strides, strict=True):
            h, w = f.shape[-2:]
            if abs(h - height / s) >= 1 or abs(w - width / s) >= 1:
                raise ConfigError(
                    f"mask head: a {h}x{w} feature map for a {height}x{width} input is not at stride {s}; set "
                    f"mask_head.featmap_strides {list(self.featmap_strides)} to the neck's strides of in_index "
                    f"{list(self.in_index)}"
                )
        return self.fusion(selected)

    def _extent(self, emb: Tensor) -> tuple[int, int]:
        """Input pixels (H, W) covered by the embedding grid."""
        s = self.featmap_strides[0]
        return emb.shape[-2] * s, emb.shape[-1] * s

    def loss(self, feats: Sequence[Tensor], batch_data_samples: Sequence[DetDataSample]) -> dict[str, Tensor]:
        """Mask losses with jittered ground-truth boxes as prompts. Images without instances contribute nothing;
        a batch without any gives zero losses that still reach every parameter (for DDP)."""
        emb = self.image_embedding(feats, batch_data_samples[0].metainfo["batch_input_shape"])
        extent = self._extent(emb)
        out_size = (4 * emb.shape[-2], 4 * emb.shape[-1])  # the mask decoder upscales 4x
        boxes, targets, index = [], [], []
        for i, sample in enumerate(batch_data_samples):
            gt = sample.gt_instances
            n = len(gt)
            if n == 0:
                continue
            if "masks" not in gt:
                raise ConfigError(
                    "the instance mask head needs gt_instances.masks; load annotations with "
                    "dict(type='LoadAnnotations', with_bbox=True, with_mask=True)"
                )
            keep = torch.randperm(n)[: self.max_prompts_per_image]
            gt_boxes = get_box_tensor(gt.bboxes)[keep.to(emb.device)].to(emb.dtype)
            img_h, img_w = sample.metainfo["img_shape"][:2]
            boxes.append(jitter_boxes(gt_boxes, self.box_jitter, self.box_jitter_max, (img_h, img_w)))
            targets.append(self._mask_targets(gt.masks, keep.numpy(), extent, out_size, emb.device))
            index.append(torch.full((len(keep),), i, dtype=torch.long, device=emb.device))
        if boxes:
            box_t, target_t, index_t = torch.cat(boxes), torch.cat(targets), torch.cat(index)
        else:
            box_t = emb.new_zeros((0, 4))
            target_t = emb.new_zeros((0, *out_size))
            index_t = torch.zeros(0, dtype=torch.long, device=emb.device)
        sparse = self.decoder.embed_boxes(box_t, extent)
        logits, iou_pred = self.decoder(emb, sparse, index_t, chunk_size=self.prompt_chunk_size)
        logits, iou_pred = logits[:, 0], iou_pred[:, 0]
        if logits.shape[0] == 0:
            zero = logits.sum() + iou_pred.sum()
            return {"loss_mask": zero, "loss_dice": zero, "loss_mask_iou": zero}
        loss_bce = F.binary_cross_entropy_with_logits(logits, target_t)
        loss_dice = dice_loss(logits.sigmoid().flatten(1), target_t.flatten(1), eps=1.0, naive_dice=True)
        with torch.no_grad():
            pred, truth = (logits > self.mask_threshold).flatten(1), (target_t > 0.5).flatten(1)
            inter, union = (pred & truth).sum(1), (pred | truth).sum(1)
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(iou_pred))
        loss_iou = F.mse_loss(iou_pred, iou.to(iou_pred.dtype))
        return {
            "loss_mask": self.loss_bce_weight * loss_bce,
            "loss_dice": self.loss_dice_weight * loss_dice,
            "loss_mask_iou": self.loss_iou_weight * loss_iou,
        }

    @staticmethod
    def _mask_targets(
        masks: Any, keep: np.ndarray, extent: tuple[int, int], out_size: tuple[int, int], device: torch.device
    ) -> Tensor:
        """mmdet ``BitmapMasks`` / ``PolygonMasks`` (or an N x H x W tensor) -> n x out_size soft targets: padded or
        cropped to the grid's extent, then area-averaged to the mask resolution."""
        if isinstance(masks, Tensor):
            t = masks[torch.from_numpy(keep).to(masks.device)].to(device=device, dtype=torch.float32)
        else:
            t = masks[keep].to_tensor(dtype=torch.float32, device=device)
        eh, ew = extent
        t = t[:, :eh, :ew]
        t = F.pad(t, (0, ew - t.shape[-1], 0, eh - t.shape[-2]))
        return F.interpolate(t.unsqueeze(1), size=out_size, mode="area").squeeze(1)

    @torch.no_grad()
    def predict(
        self,
        feats: Sequence[Tensor],
        boxes_list: Sequence[Tensor],
        batch_img_metas: Sequence[dict[str, Any]],
        rescale: bool = True,
    ) -> list[Tensor]:
        """One mask per box.

        Args:
            feats: the neck's levels.
            boxes_list: per image, N_i x 4 boxes (x1, y1, x2, y2) in input (``img_shape``) pixels.
            batch_img_metas: per image, mmdet metainfo (``batch_input_shape``, ``img_shape``, ``ori_shape``).
            rescale: masks at ``ori_shape`` (else at ``img_shape``).

        Returns:
            per image, N_i x H x W bool masks.
        """
        emb = self.image_embedding(feats, batch_img_metas[0]["batch_input_shape"])
        extent = self._extent(emb)
        sizes = [tuple(m["ori_shape" if rescale else "img_shape"][:2]) for m in batch_img_metas]
        counts = [len(b) for b in boxes_list]
        results = [
            torch.zeros((n, *hw), dtype=torch.bool, device=emb.device) for n, hw in zip(counts, sizes, strict=True)
        ]
        total = sum(counts)
        if total == 0:
            return results
        boxes = torch.cat([get_box_tensor(b) for b in boxes_list]).to(emb.dtype)
        index = torch.repeat_interleave(
            torch.arange(len(counts), device=emb.device), torch.tensor(counts).to(emb.device)
        )
        offsets = np.cumsum([0, *counts])
        step = self.prompt_chunk_size or total
        for start in range(0, total, step):
            stop = min(start + step, total)
            sparse = self.decoder.embed_boxes(boxes[start:stop], extent)
            logits, _ = self.decoder(emb, sparse, index[start:stop])
            for i, meta in enumerate(batch_img_metas):
                lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
                if lo < hi:
                    pasted = self._paste(logits[lo - start : hi - start, :1], extent, meta, sizes[i])
                    results[i][lo - offsets[i] : hi - offsets[i]] = pasted
        return results

    def _paste(self, logits: Tensor, extent: tuple[int, int], meta: dict[str, Any], size: tuple[int, ...]) -> Tensor:
        """n x 1 x 4h x 4w logits -> n x H x W bool: upsampled to the grid's extent, cropped to ``img_shape``,
        resized to ``size``."""
        up = F.interpolate(logits, size=extent, mode="bilinear", align_corners=False)
        img_h, img_w = meta["img_shape"][:2]
        # A backbone that floors odd sizes covers slightly less than the image: extend its last row / column.
        up = F.pad(up, (0, max(0, img_w - extent[1]), 0, max(0, img_h - extent[0])), mode="replicate")
        up = up[..., :img_h, :img_w]
        if (img_h, img_w) != size:
            up = F.interpolate(up, size=size, mode="bilinear", align_corners=False)
        return up[:, 0] > self.mask_threshold
