"""The demo's models, obtained without downloading anything: the small configs in ``configs/demo/`` fine-tuned
(from scratch) on crops of a generated image drawn from the same distribution as the demo's images, and cached.

A trained model is kept under ``<cache>/<task>-<key>/`` (``config.py``: the resolved config the run saved,
``model.pth``: weights and dataset meta, no optimizer state, ``model.json``: what was trained and how it went).
The key hashes everything that decides the weights: the resolved config, the generator version, the training
image, the crops, the iterations, the batch size and the seed; a second run with the same key skips training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from densevision.configs import find_config
from densevision.errors import OutputError
from densevision.io.atomic import replacing
from densevision.synthetic.crop_datasets import CropDataset, write_ade_crops, write_coco_crops
from densevision.synthetic.scenes import GENERATOR_VERSION, SceneSpec, Sources, build, class_names

Task = Literal["segmentation", "detection"]
# Shipped config names (densevision.configs).
CONFIG: dict[Task, str] = {
    "segmentation": "demo/upernet_swin-tiny_demo-256",
    "detection": "demo/dino_swin-tiny_demo-256",
}


@dataclass(frozen=True)
class TrainSpec:
    """How one demo model is trained: ``iters`` iterations of ``batch_size`` crops of ``crop`` pixels (on a grid of
    ``stride``) of the generated image ``scene``."""

    task: Task
    scene: SceneSpec
    iters: int
    batch_size: int = 4
    crop: int = 256
    stride: int = 128
    seed: int = 0

    @property
    def config(self) -> Path:
        return find_config(CONFIG[self.task])


@dataclass(frozen=True)
class TrainedModel:
    """A demo model ready for inference: its config and weights, whether they came from the cache, and the
    record of its training (``model.json``)."""

    config: Path
    checkpoint: Path
    cached: bool
    record: dict[str, Any]


def default_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/densevision/demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "densevision" / "demo"


def cache_key(spec: TrainSpec) -> str:
    """A hash of what decides the trained weights: the resolved config (its ``_base_`` included), the
    generator version and the training spec."""
    from mmengine.config import Config

    config = Config.fromfile(str(spec.config)).to_dict()
    what = {
        "config": config,
        "generator_version": GENERATOR_VERSION,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "task"},
        "task": spec.task,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_dataset(spec: TrainSpec, root: Path, sources: Sources) -> CropDataset:
    image = root / ("train.tiff" if spec.scene.kind == "slide" else "train.tif")
    objects = build(spec.scene, image, sources)
    classes, out = class_names(spec.scene.kind), root / "data"
    if spec.task == "segmentation":
        dataset = write_ade_crops(
            image, objects, classes, out, crop=spec.crop, stride=spec.stride, only_with_objects=True
        )
    else:
        dataset = write_coco_crops(image, objects, classes, out, crop=spec.crop, stride=spec.stride)
    image.unlink()
    return dataset


def _save_slim(checkpoint: Path, out: Path) -> None:
    """The weights and meta of an mmengine checkpoint, without the optimizer state (a third of the size)."""
    import torch

    from densevision.compat import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    torch.save({"meta": ckpt.get("meta", {}), "state_dict": ckpt["state_dict"]}, out)


def obtain_model(
    spec: TrainSpec,
    sources: Sources,
    cache_dir: Path,
    *,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> TrainedModel:
    """The model of ``spec`` from the cache, or trained now (and cached) on crops of an image generated from the
    real ``sources``.

    Raises:
        OutputError: the cache folder cannot be written.
    """
    from densevision.apis.train import train

    entry = cache_dir / f"{spec.task}-{cache_key(spec)}"
    manifest = entry / "model.json"
    if manifest.is_file() and not retrain:
        record = json.loads(manifest.read_text())
        log(f"{spec.task}: model from the cache ({entry})")
        return TrainedModel(entry / "config.py", entry / "model.pth", True, record)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{cache_dir}: cannot create the model cache ({e.strerror}); pass --cache-dir DIR") from e
    log(f"{spec.task}: training {spec.config.name} for {spec.iters} iterations on generated crops ...")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{spec.task}-", dir=cache_dir) as tmp:
        dataset = _write_dataset(spec, Path(tmp), sources)
        data_seconds = time.perf_counter() - started
        result = train(
            spec.config,
            work_dir=Path(tmp) / "work",
            data_root=dataset.root,
            max_iters=spec.iters,
            num_workers=0,
            batch_size=spec.batch_size,
            seed=spec.seed,
        )
        with replacing(entry) as partial:  # a folder: config, weights and record appear together
            partial.mkdir()
            shutil.copyfile(result["config"], partial / "config.py")
            _save_slim(Path(result["checkpoint"]), partial / "model.pth")
            losses = result["losses"]
            record = {
                "task": spec.task,
                "config": str(spec.config),
                "spec": dataclasses.asdict(spec),
                "generator_version": GENERATOR_VERSION,
                "classes": result["classes"],
                "images": dataset.images,
                "objects": dataset.objects,
                "iterations": result["iterations"],
                "loss_first": losses[0] if losses else None,
                "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                "val_metrics": result["metrics"],
                "seconds_data": data_seconds,
                "seconds_total": time.perf_counter() - started,
            }
            (partial / "model.json").write_text(json.dumps(record, indent=2, default=str))
    log(f"{spec.task}: trained in {record['seconds_total']:.0f} s, cached in {entry}")
    return TrainedModel(entry / "config.py", entry / "model.pth", False, record)
