"""Loading a checkpoint into a built mmdet / mmseg model strictly, through the safe loader."""

from __future__ import annotations

import os
from typing import Any

import torch

from densevision.compat import load_checkpoint, load_state_dict_strictly
from densevision.errors import CheckpointError


def load_weights(model: torch.nn.Module, checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``checkpoint`` (an mmengine checkpoint with ``state_dict`` and ``meta``, or a bare state dict) into
    ``model``; every parameter and buffer must be there with its shape, and nothing else. Returns the dataset meta
    the checkpoint carries (lower-case keys, e.g. ``classes``, ``palette``), or ``{}``."""
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint file; check the -w path")
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{checkpoint}: not a checkpoint (a {type(ckpt).__name__}, not a dict of weights)")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{checkpoint}: its state_dict is not a mapping of names to tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    load_state_dict_strictly(
        model,
        state,
        what=f"{checkpoint} does not fit the model of the config",
        fix="use the config the checkpoint was trained with (and its class count)",
    )
    meta = ckpt.get("meta") or {}
    dataset_meta = meta.get("dataset_meta") or ({"classes": meta["CLASSES"]} if "CLASSES" in meta else {})
    return {str(k).lower(): v for k, v in dataset_meta.items()}
