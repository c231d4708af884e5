"""Official Segment Anything checkpoints into the prompt encoder / mask decoder of densevision's heads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from densevision.compat import load_checkpoint, load_state_dict_strictly, name_keys
from densevision.errors import CheckpointError
from densevision.models.sam_decoder import SamPromptDecoder

# Top-level prefixes of sam_vit_b / sam_vit_l / sam_vit_h .pth files (plain state dicts).
SAM_LOADED_PREFIXES = ("prompt_encoder.", "mask_decoder.")
SAM_UNUSED_PREFIXES = ("image_encoder.",)


def _state_dict_of(ckpt: Any, path: str | os.PathLike[str]) -> Mapping[str, Any]:
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]  # the same weights re-saved by mmengine
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a state dict; pass an official SAM .pth")
    return ckpt


def find_sam_decoder(module: nn.Module) -> tuple[str, SamPromptDecoder]:
    """The one :class:`SamPromptDecoder` inside ``module`` (or ``module`` itself) and its qualified name."""
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, SamPromptDecoder)]
    if len(found) != 1:
        raise CheckpointError(
            f"{type(module).__name__} holds {len(found)} SAM prompt decoders; SAM weights load into exactly one "
            "(pass the head, or the decoder itself)"
        )
    return found[0]


def load_sam_weights(module: nn.Module, checkpoint_path: str | os.PathLike[str]) -> list[str]:
    """Load an official SAM checkpoint's prompt encoder and mask decoder into ``module``, strictly.

    ``module`` is a head holding one :class:`SamPromptDecoder` (``SamSemanticHead``, ``SamBoxMaskHead``, a whole
    ``BoxPromptedInstanceSegmentor``) or the decoder itself. Key mapping, with ``<d>`` the decoder's qualified name
    in ``module`` (``decoder`` in both heads, ``mask_head.decoder`` in the instance segmentor)::

        checkpoint key (sam_vit_b/l/h .pth)       ->  module state-dict key
        prompt_encoder.<rest>                     ->  <d>.prompt_encoder.<rest>
        mask_decoder.<rest>                       ->  <d>.mask_decoder.<rest>
        image_encoder.*                           ->  not loaded (the heads make their embedding from FPN features)

    ``<rest>`` is unchanged: the decoder is built from segment_anything's own classes at SAM's sizes. Every one of
    the decoder's keys must be in the checkpoint with the same shape, and the checkpoint may hold nothing else.

    Args:
        module: the module to load into (its parameters are overwritten in place).
        checkpoint_path: an official SAM checkpoint (read through :func:`densevision.compat.load_checkpoint`,
            ``weights_only``); the same state dict under mmengine's ``state_dict`` key is accepted.

    Returns:
        The sorted state-dict keys of ``module`` that were *not* loaded (the head's own FPN fusion, class
        embeddings, ...); callers assert they are the ones they expect.

    Raises:
        CheckpointError: missing keys, shape mismatches or keys outside SAM's layout (all named), or no decoder.
    """
    name, decoder = find_sam_decoder(module)
    state = _state_dict_of(load_checkpoint(checkpoint_path), checkpoint_path)
    foreign = sorted(k for k in state if not k.startswith(SAM_LOADED_PREFIXES + SAM_UNUSED_PREFIXES))
    if foreign:
        raise CheckpointError(
            f"{checkpoint_path}: keys outside SAM's layout (image_encoder.*, prompt_encoder.*, mask_decoder.*): "
            f"{name_keys(foreign)}; pass an official sam_vit_b/l/h checkpoint"
        )
    given = {k: v for k, v in state.items() if k.startswith(SAM_LOADED_PREFIXES)}
    load_state_dict_strictly(
        decoder,
        given,
        what=f"{checkpoint_path}: does not fit the SAM prompt encoder / mask decoder",
        fix="use an official SAM checkpoint and the decoder's default sizes",
    )
    if not name:  # the decoder itself: everything was loaded
        return []
    return sorted(k for k in module.state_dict() if not k.startswith(f"{name}."))


def check_not_loaded(not_loaded: list[str], expected_prefixes: tuple[str, ...], owner: str) -> None:
    """Raise unless every key left out by :func:`load_sam_weights` is under ``expected_prefixes`` (the head's own
    parts): anything else would be a parameter silently left at its initial value."""
    stray = [k for k in not_loaded if not k.startswith(expected_prefixes)]
    if stray:
        raise CheckpointError(
            f"{owner}: SAM weights left parameters outside {', '.join(expected_prefixes)} at their initial values "
            f"({name_keys(stray)}); this head does not fit SAM's layout"
        )
