"""Building an mmdet / mmseg model from its config through the registries, as mmdet's ``init_detector`` and mmseg's
``init_model`` do, without their assumptions: they require ``model.backbone`` and a ``test_dataloader``, so a config
holding only ``model`` (and its classes) stopped there with a traceback. Weights come from the checkpoint, loaded
strictly through the safe loader, or, without one, from the model's own initialisation as training starts."""

from __future__ import annotations

import importlib
import os
from typing import Any

from densevision.compat import patch_mmengine
from densevision.configs import find_config, load_config
from densevision.errors import CheckpointError, ConfigError
from densevision.predictors.weights import load_weights


def config_meta(cfg: Any) -> dict[str, Any]:
    """The dataset meta (``classes``, ``palette``) a config names: a top-level ``metainfo`` or ``classes``, else the
    ``metainfo`` of its test, validation or training dataset; ``{}`` when it names none."""
    if isinstance(cfg.get("metainfo"), dict) and cfg.metainfo.get("classes"):
        return dict(cfg.metainfo)
    if cfg.get("classes"):
        return {"classes": tuple(cfg.classes)}
    for split in ("test_dataloader", "val_dataloader", "train_dataloader"):
        dataset = (cfg.get(split) or {}).get("dataset") or {}
        meta = dataset.get("metainfo") if isinstance(dataset, dict) else None
        if meta and meta.get("classes"):
            return dict(meta)
    return {}


def build_model(
    config: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None,
    *,
    scope: str,
    cfg_options: dict[str, Any] | None = None,
) -> Any:
    """The model of ``config`` (a path or a shipped config's name) in the ``mmdet`` or ``mmseg`` registry, on the
    CPU, with its weights and ``dataset_meta`` (the checkpoint's, else the config's, see :func:`config_meta`)."""
    path = find_config(config)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint file; check the -w path")
    patch_mmengine()
    from mmengine.registry import init_default_scope

    cfg = load_config(path, cfg_options)
    if not isinstance(cfg.get("model"), dict):
        raise ConfigError(f"{path}: the config has no `model` dict; give an mmdet / mmseg model config")
    model_cfg = cfg.model
    # Weights come from -w: no pretrained backbone is fetched (init_detector / init_model do the same).
    if isinstance(model_cfg.get("backbone"), dict) and "init_cfg" in model_cfg.backbone:
        model_cfg.backbone.init_cfg = None
    if scope == "mmseg":
        model_cfg.pretrained = None
        model_cfg.train_cfg = None
    init_default_scope(cfg.get("default_scope", scope))
    registry = importlib.import_module(f"{scope}.registry").MODELS
    try:
        model = registry.build(model_cfg)
    except KeyError as e:
        if "registry" not in str(e):
            raise
        # mmengine: "X is not in the mmdet::model registry. Please check whether the value of X is correct ..."
        raise ConfigError(f"{path}: cannot build its model: {e.args[0] if e.args else e}") from e
    if scope == "mmdet":
        from mmengine.model import revert_sync_batchnorm

        model = revert_sync_batchnorm(model)
    meta: dict[str, Any] = {}
    if checkpoint is not None:
        meta = load_weights(model, checkpoint)
    else:  # the config's initialisation, as training starts (init_detector / init_model leave tensors uninitialised)
        model.init_weights()
    model.dataset_meta = meta if meta.get("classes") else config_meta(cfg) or meta
    model.cfg = cfg
    return model
