"""The classes a run uses: where they come from, and writing them into every part of the config that counts them.

The choice, first that applies:

1. a checkpoint's classes (evaluation: ``meta.dataset_meta.classes``, which mmengine saves from the dataset);
2. the config's own ``metainfo.classes`` of the first split the run reads;
3. the data's (COCO categories in file order, ADE's ``objectInfo*.txt``) when they differ from the dataset type's
   defaults, so fine-tuning a COCO config on three categories trains three classes, not COCO's 80;
4. the dataset type's defaults.

Then every dataset of every split gets them as ``metainfo`` (a typed mmseg dataset with other classes becomes a
``BaseSegDataset`` with the same file conventions: mmseg remaps labels by name to its own classes and refuses new
names) and every ``num_classes`` in ``cfg.model`` is set to their number, so the config saved beside the
checkpoints builds the model they fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from densevision.errors import ConfigError, DatasetError
from densevision.training.config import DatasetEntry


def choose_classes(cfg: Any, first: Sequence[DatasetEntry], fixed: Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    """The classes and their source ("checkpoint", "config" or "data") by the order in the module docstring.

    Args:
        first: the datasets of the split that decides (the first the run reads).
        fixed: a checkpoint's classes, or None.
    """
    explicit = next((d.explicit_classes for d in first if d.explicit_classes), None)
    if fixed is not None:
        chosen, source = tuple(fixed), "checkpoint"
    elif explicit is not None:
        chosen, source = explicit, "config"
    else:
        from_data = first[0].data_classes()
        default = first[0].default_classes
        chosen, source = (from_data, "data") if from_data and from_data != default else (default, "config")
    if not chosen:
        raise ConfigError(f"{cfg.filename}: no classes: name them in the dataset's metainfo.classes")
    return chosen, source


def check_declared_classes(datasets: Sequence[DatasetEntry], classes: tuple[str, ...], source: str) -> None:
    """Segmentation label values mean the classes ``objectInfo*.txt`` names: a run with other classes is refused."""
    if source == "data":
        return
    for d in datasets:
        if d.kind != "seg":
            continue
        declared = d.data_classes()
        if declared is not None and declared != classes:
            raise DatasetError(
                f"{d.cfg.get('data_root')}: objectInfo names classes {declared} but the run uses {classes} "
                f"(from the {source}); label values must mean the same classes"
            )


def palette(classes: Sequence[str]) -> list[list[int]]:
    """One RGB colour per class, the same for the same number of classes."""
    rng = np.random.default_rng(len(classes))
    return [[int(v) for v in rng.integers(0, 256, 3)] for _ in classes]


def set_num_classes(node: Any, k: int) -> int:
    """Set every ``num_classes`` under ``node`` (dicts and lists) to ``k``; returns how many were set."""
    n = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "num_classes" and isinstance(value, int):
                node[key] = k
                n += 1
            else:
                n += set_num_classes(value, k)
    elif isinstance(node, list | tuple):
        n += sum(set_num_classes(v, k) for v in node)
    return n


def apply_classes(cfg: Any, datasets: Sequence[DatasetEntry], classes: tuple[str, ...]) -> None:
    """Write ``classes`` into ``datasets``' metainfo and every ``num_classes`` of the model (see module doc)."""
    for d in datasets:
        if d.default_classes == classes and not d.explicit_classes:
            continue  # the dataset type's own classes: leave the config as it is
        if d.kind == "seg" and d.default_classes and d.default_classes != classes:
            opts = d.seg_options()
            d.cfg["type"] = "BaseSegDataset"
            d.cfg.update(opts)
        d.cfg["metainfo"] = {"classes": classes, "palette": palette(classes)}
    if not set_num_classes(cfg.model, len(classes)):
        raise ConfigError(f"{cfg.filename}: the model has no num_classes to set for {len(classes)} classes")
    if isinstance(cfg.get("num_classes"), int):
        cfg["num_classes"] = len(classes)


def checkpoint_classes(checkpoint: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names a checkpoint was trained with (``meta.dataset_meta.classes``), read through the safe loader."""
    from densevision.compat import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    classes = (meta.get("dataset_meta") or {}).get("classes")
    return tuple(str(c) for c in classes) if classes else None
