"""Segment Anything (``segment-anything``) prompted with detector boxes: one tile (window) in, one mask per box out.

Checkpoints are the official ones (``sam_vit_b_01ec64.pth`` ...) or any state dict in their key layout
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``). They load through the safe loader
(:func:`densevision.compat.load_checkpoint`) and strictly: a missing, unexpected or mis-shaped key stops the load
with its name. ``segment_anything``'s own builders are called without ``checkpoint=``, which would use plain
``torch.load``.

Batches. :meth:`SamBoxPredictor.predict_windows` takes several windows at once: one encoder pass over all of them
(``B x 3 x 1024 x 1024``), then the boxes of every window decoded together, ``box_batch`` at a time, each against
its own window's embedding (:func:`densevision.models.sam_decoder.predict_masks_batched`). Per window it computes
what segment_anything's ``SamPredictor`` does (``set_image`` then ``predict_torch``), up to float rounding.

Cost. Each window's long side is resized to 1024 pixels and padded to 1024 x 1024 before the ViT encoder, as
``set_image`` does, so every window costs one full encoder pass whatever its size (ViT-B about 13 s on 2 CPU cores,
well under a second on a GPU): a 256-pixel tile is upsampled 4x at the same price as a 1024-pixel one, and a larger
one is downsampled (details finer than ``size / 1024`` pixels are lost). Tiles of 1024 use the encoder best. The
prompts are cheap by comparison: the decoder runs once per ``box_batch`` boxes, whose masks are upsampled to
1024 x 1024 and then to the window's size as float32 (about ``box_batch * (4 MiB + 4 * H * W)`` bytes at a time).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from densevision.compat import load_checkpoint, load_state_dict_strictly
from densevision.errors import CheckpointError, ConfigError, InvalidRegionError
from densevision.models.sam_decoder import predict_masks_batched

# model type -> (encoder embedding width, encoder depth), as segment_anything.build_sam builds them
SAM_MODEL_TYPES: dict[str, tuple[int, int]] = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def infer_sam_model_type(state_dict: Mapping[str, Any]) -> str:
    """``vit_b``, ``vit_l`` or ``vit_h`` from the encoder's patch-embedding width (768, 1024, 1280), else from its
    block count (12, 24, 32). A checkpoint whose width and depth disagree gets the type its width names, and the
    strict load then names the blocks it lacks or has too many.

    Raises CheckpointError when the state dict is not a SAM one or its encoder matches no variant."""
    weight = state_dict.get(_PATCH_KEY)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        raise CheckpointError(
            f"the checkpoint has no 4-d {_PATCH_KEY!r}, so it is not a Segment Anything checkpoint in the official "
            "key layout; pass a SAM checkpoint (e.g. sam_vit_b_01ec64.pth) or convert its keys"
        )
    width = int(weight.shape[0])
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    for i in (0, 1):  # by width first, then by depth
        for name, shape in SAM_MODEL_TYPES.items():
            if shape[i] == (width, depth)[i]:
                return name
    known = ", ".join(f"{n} ({w} wide, {d} blocks)" for n, (w, d) in SAM_MODEL_TYPES.items())
    raise CheckpointError(
        f"the checkpoint's image encoder is {width} wide with {depth} blocks, which matches none of {known}; "
        "it is not an official SAM variant"
    )


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict of a loaded checkpoint: the official files are one; training checkpoints nest it."""
    if isinstance(obj, Mapping) and _PATCH_KEY not in obj:
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict of tensors; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return {str(k): v for k, v in obj.items()}


def sam_from_state_dict(state_dict: Mapping[str, torch.Tensor], model_type: str | None = None) -> torch.nn.Module:
    """Build ``segment_anything``'s ``Sam`` of ``model_type`` (inferred when None) and load ``state_dict`` strictly.

    Raises ConfigError for an unknown model type, CheckpointError when the weights do not fit it (the message names
    the missing, unexpected and mis-shaped keys)."""
    from segment_anything import sam_model_registry

    if model_type is not None and model_type not in SAM_MODEL_TYPES:
        raise ConfigError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
    if model_type is None:
        kind = infer_sam_model_type(state_dict)
    else:
        kind = model_type
        if _PATCH_KEY in state_dict and (inferred := infer_sam_model_type(state_dict)) != model_type:
            raise CheckpointError(
                f"the checkpoint holds a SAM {inferred} but {model_type} was asked for; pass {inferred} or no type"
            )
    model = sam_model_registry[kind]()
    load_state_dict_strictly(
        model,
        state_dict,
        what=f"the checkpoint does not fit SAM {kind}",
        fix="pass an unmodified SAM checkpoint of that type",
    )
    return model.eval()


class SamBoxPredictor:
    """Box-prompted SAM on windows (stateless between calls; see the module docstring for the batches and the cost).

    ``predictor(image, boxes)``: ``image`` ``H x W x 3`` uint8 RGB, ``boxes`` ``N x 4`` float (x0, y0, x1, y1) in
    the image's pixels (pixel-edge convention) -> ``(masks N x H x W bool, scores N float32)``, the scores being
    SAM's predicted IoU of each mask (as the model gives it, unclipped). ``predictor.predict_windows(images,
    boxes)`` does the same for several windows in one encoder pass. Windows without boxes are not encoded; the
    boxes are decoded ``box_batch`` at a time, one mask each (``multimask_output=False``: a box is an unambiguous
    prompt).
    """

    def __init__(self, model: torch.nn.Module, *, box_batch: int = 64) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        if box_batch < 1:
            raise ConfigError(f"box_batch must be positive, got {box_batch}")
        self.model = model.eval()
        self.box_batch = box_batch
        encoder: Any = self.model.image_encoder
        self._transform = ResizeLongestSide(encoder.img_size)  # SAM's 1024

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        model_type: str | None = None,
        *,
        device: str | torch.device = "cpu",
        trust: bool | None = None,
        box_batch: int = 64,
    ) -> SamBoxPredictor:
        """Load a SAM checkpoint in the official key layout.

        Args:
            path: the ``.pth`` file: a state dict (or a dict holding one under ``model`` / ``state_dict``).
            model_type: ``vit_b``, ``vit_l`` or ``vit_h``; None infers it from the encoder's width and depth.
            device: where the model runs.
            trust: unpickle arbitrary objects (see :func:`densevision.compat.load_checkpoint`).
            box_batch: boxes decoded at once (bounds the float32 mask memory).
        """
        if model_type is not None and model_type not in SAM_MODEL_TYPES:
            raise ConfigError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
        state = _unwrap(load_checkpoint(path, map_location="cpu", trust=trust))
        try:
            model = sam_from_state_dict(state, model_type)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return cls(model.to(torch.device(device)), box_batch=box_batch)

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.predict_windows([image], [boxes])[0]

    @torch.inference_mode()
    def predict_windows(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(masks, scores)`` of each window's boxes, as :meth:`__call__` gives them one window at a time."""
        if len(images) != len(boxes):
            raise ConfigError(f"got {len(images)} windows but {len(boxes)} box arrays; pass one per window")
        checked = [_check_inputs(im, b) for im, b in zip(images, boxes, strict=True)]
        results = [(np.zeros((len(b), *im.shape[:2]), bool), np.zeros(len(b), np.float32)) for im, b in checked]
        busy = [k for k, (_, b) in enumerate(checked) if len(b)]
        if not busy:
            return results
        model: Any = self.model  # segment_anything's Sam (its submodules untyped)
        device = self.device
        # segment_anything's preprocess per window: long side to 1024 (PIL), then (x - mean) / std, then zero padding.
        side = model.image_encoder.img_size
        inputs = [self._transform.apply_image(checked[k][0]) for k in busy]
        batch = torch.zeros((len(busy), 3, side, side), device=device)
        for row, pixels in zip(batch, inputs, strict=True):
            h, w = pixels.shape[:2]
            x = torch.as_tensor(pixels, device=device).permute(2, 0, 1)
            row[:, :h, :w] = (x - model.pixel_mean) / model.pixel_std
        embeddings = model.image_encoder(batch)
        prompt, decoder = model.prompt_encoder, model.mask_decoder
        dense = prompt.get_dense_pe()
        src = embeddings + prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)  # what predict_masks adds per prompt
        # Every box of every window, in window order, with the window it belongs to; window i's boxes start at first[i].
        counts = [len(checked[k][1]) for k in busy]
        first = np.cumsum([0, *counts])
        owner = torch.as_tensor(np.repeat(np.arange(len(busy)), counts), device=device)
        local = torch.cat([
            self._transform.apply_boxes_torch(
                torch.as_tensor(checked[k][1], dtype=torch.float32, device=device), checked[k][0].shape[:2]
            )
            for k in busy
        ])  # fmt: skip
        for start in range(0, len(local), self.box_batch):  # box_batch masks (upsampled, float32) at a time
            stop = min(start + self.box_batch, len(local))
            sparse, _ = prompt(points=None, boxes=local[start:stop], masks=None)
            low_res, iou = predict_masks_batched(decoder, src, dense, sparse, owner[start:stop], slice(0, 1))
            for i in range(int(np.searchsorted(first, start, "right")) - 1, len(busy)):
                a, b = max(start, first[i]), min(stop, first[i + 1])
                if a >= b:
                    break
                masks, scores = results[busy[i]]
                up = model.postprocess_masks(low_res[a - start : b - start], inputs[i].shape[:2], masks.shape[1:])
                masks[a - first[i] : b - first[i]] = (up[:, 0] > model.mask_threshold).cpu().numpy()
                scores[a - first[i] : b - first[i]] = iou[a - start : b - start, 0].float().cpu().numpy()
        return results


def _check_inputs(image: Any, boxes: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ConfigError(
            f"SAM needs an H x W x 3 uint8 RGB image, got a {what}; select three bands and map values to 0..255 "
            "(--value-range) first"
        )
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise InvalidRegionError(f"SAM needs a non-empty image, got {w} x {h}")
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InvalidRegionError(f"expected boxes of shape N x 4 (x0, y0, x1, y1), got {b.shape}")
    bad = ~np.isfinite(b).all(axis=1) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    bad |= (b[:, :2] < 0).any(axis=1) | (b[:, 2] > w) | (b[:, 3] > h)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise InvalidRegionError(
            f"box {k} = {b[k].tolist()} is not an (x0, y0, x1, y1) box inside the {w} x {h} image; pass boxes in the "
            "window's own pixels (image coordinates minus the window's origin, divided by its downsample)"
        )
    return np.ascontiguousarray(image), b
