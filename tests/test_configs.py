"""Every config under configs/ reads, inherits at most one level, builds its model, data pipelines, evaluator,
optimizer and schedule, and runs one loss (with backward) and one prediction on the CPU at a small, awkward size.

Sizes are shrunk only where the full size does not fit a unit test: repeated transformer layers (one of each
stack is built), query counts, class counts (4: a SAM-style head runs its decoder once per class) and the crop
size data preprocessors pad to. Everything else is the config as written."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.py") if "_base_" not in p.parts)  # not __init__.py
BASES = sorted((REPO / "configs" / "_base_").glob("*.py"))
H, W = 72, 100  # neither a multiple of 32 nor square
QUERIES = 60  # two-stage DINO picks queries among the encoder tokens: 72 x 100 px gives 719
CLASSES = 4


def _id(p: Path) -> str:
    return str(p.relative_to(REPO / "configs"))


def test_there_are_configs():
    names = {_id(p) for p in CONFIGS}
    assert {
        "detection/dino_swin-t_fpn_coco.py",
        "detection/dino_convnext-t_fpn_coco.py",
        "detection/detr_swin-t_coco.py",
        "detection/detr_convnext-t_coco.py",
        "segmentation/upernet_swin-t_ade20k-512.py",
        "segmentation/upernet_convnext-t_ade20k-512.py",
    } <= names


def _base_of(path: Path) -> list[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_base_" for t in node.targets):
            value = ast.literal_eval(node.value)
            return [value] if isinstance(value, str) else list(value)
    return []


@pytest.mark.parametrize("path", CONFIGS + BASES, ids=_id)
def test_inheritance_is_shallow(path):
    """A config has at most one base, and a base has none: what a config file says is nearly all there is. The
    demo's small variants (configs/demo/) take the model config they shrink as their one base."""
    bases = _base_of(path)
    assert len(bases) <= 1, bases
    for base in bases:
        target = (path.parent / base).resolve()
        if path.parent.name == "demo":
            assert target.parent.parent == (REPO / "configs").resolve() and target.parent.name != "_base_", base
            test_inheritance_is_shallow(target)
            continue
        assert target.parent == (REPO / "configs" / "_base_").resolve(), base
        assert not _base_of(target), f"{base} inherits again"


def _load(path: Path):
    from mmengine.config import Config

    cfg = Config.fromfile(str(path))
    scope = cfg.default_scope
    if scope == "mmdet":
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    for module in (cfg.get("custom_imports") or {}).get("imports", []):
        importlib.import_module(module)
    return cfg


def _shrink(node, in_transformer: bool = False) -> None:
    """Fewer repeats and queries, in place (see module doc)."""
    if isinstance(node, dict):
        if "layer_cfg" in node and isinstance(node.get("num_layers"), int):
            node["num_layers"] = 1
        for key in ("num_queries", "max_per_img"):
            if isinstance(node.get(key), int):
                node[key] = min(node[key], QUERIES)
        if isinstance(node.get("num_classes"), int):
            node["num_classes"] = CLASSES
        if isinstance(node.get("size"), tuple | list) and node.get("type", "").endswith("DataPreProcessor"):
            node["size"] = (H, W)
        if node.get("mode") == "slide":
            node["crop_size"], node["stride"] = (48, 64), (32, 48)  # several overlapping windows on 72 x 100
        for v in node.values():
            _shrink(v)
    elif isinstance(node, list | tuple):
        for v in node:
            _shrink(v)


def _image_and_objects(seed: int = 0):
    """A 3 x H x W image in 0..255 with two flat rectangles, their boxes, labels and masks."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(60, 200, size=(3, H, W))
    boxes = np.array([[8, 10, 40, 50], [55, 20, 90, 64]], dtype=np.float32)
    masks = np.zeros((2, H, W), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        img[:, y0:y1, x0:x1] = [[[230]], [[40]], [[40]]] if i == 0 else [[[30]], [[200]], [[60]]]
        masks[i, y0:y1, x0:x1] = 1
    return torch.from_numpy(img).float(), boxes, np.array([0, 1]), masks


def _det_batch():
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for i in range(2):  # two images: batch norm in training needs more than one value per channel
        img, boxes, labels, masks = _image_and_objects(i)
        meta = dict(img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W), scale_factor=(1.0, 1.0), img_id=i)
        sample = DetDataSample(metainfo=meta)
        gt = InstanceData(bboxes=torch.from_numpy(boxes), labels=torch.from_numpy(labels))
        gt.masks = BitmapMasks(masks, H, W)
        sample.gt_instances = gt
        inputs.append(img)
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def _seg_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    inputs, samples = [], []
    for i in range(2):
        img, boxes, labels, _ = _image_and_objects(i)
        seg = np.full((1, H, W), 2, dtype=np.int64)
        for (x0, y0, x1, y1), k in zip(boxes.astype(int), labels, strict=True):
            seg[0, y0:y1, x0:x1] = k
        seg[0, :2] = 255  # some ignored pixels, as ADE's label 0 becomes
        sample = SegDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W)))
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(seg))
        inputs.append(img)
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_model_builds_and_runs(path):
    cfg = _load(path)
    _shrink(cfg.model)
    scope = cfg.default_scope
    if scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    batch = _det_batch() if scope == "mmdet" else _seg_batch()

    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode="loss")
    total = sum(v.sum() for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total) and total > 0, losses
    total.backward()
    # Every trainable parameter takes part in the loss, as DistributedDataParallel needs unless the config sets
    # find_unused_parameters (which costs a graph traversal per step).
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused or cfg.get("find_unused_parameters"), (
        f"parameters without gradient break distributed training: {unused[:4]} ({len(unused)}); freeze them "
        "(requires_grad=False) or set find_unused_parameters = True in the config"
    )

    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(batch, False), mode="predict")
    assert len(out) == 2
    for sample in out:
        if scope == "mmdet":
            pred = sample.pred_instances
            assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels) > 0
            assert (pred.labels < CLASSES).all()
        else:
            assert sample.pred_sem_seg.data.shape == (1, H, W)
            assert sample.seg_logits.data.shape == (CLASSES, H, W)


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_data_evaluator_optimizer_and_schedule_build(path, tmp_path):
    """The parts the Runner builds besides the model: every pipeline transform and dataset type resolves (on a
    generated dataset), the evaluator builds, the optimizer (with its constructor and parameter-wise rules) and
    schedulers build on the model. A config that redefines ``train_pipeline`` must also hand it to its loader."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DATASETS, METRICS, PARAM_SCHEDULERS

    from densevision.synthetic.datasets import make_ade_dataset, make_coco_dataset

    cfg = _load(path)
    if "train_pipeline" in cfg:
        assert cfg.train_dataloader.dataset.pipeline == cfg.train_pipeline, "train_pipeline not used by the loader"
    scope = cfg.default_scope
    root = (make_coco_dataset if scope == "mmdet" else make_ade_dataset)(tmp_path, num_train=2, num_val=1).root
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = dict(cfg[key].dataset, data_root=str(root), lazy_init=True)
        dataset = DATASETS.build(ds)
        assert dataset.pipeline.transforms  # every transform type resolved
    for key in ("val_evaluator", "test_evaluator"):
        metric = dict(cfg[key])
        if "ann_file" in metric:
            metric["ann_file"] = str(root / "annotations" / "instances_val.json")
        METRICS.build(metric)
    _shrink(cfg.model)
    if scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    n_params = sum(len(g["params"]) for g in wrapper.optimizer.param_groups)
    assert n_params == sum(1 for p in model.parameters() if p.requires_grad)
    for s in cfg.param_scheduler:
        PARAM_SCHEDULERS.build(dict(s), default_args=dict(optimizer=wrapper))


def test_pretrained_backbone_through_cfg_options(tmp_path):
    """The documented way to start from ImageNet weights: an mmpretrain ConvNeXt-T classifier checkpoint (keys
    ``backbone.*``, numpy metadata) given by --cfg-options loads through densevision's safe loader."""
    from mmengine.config import Config
    from mmseg.registry import MODELS

    from densevision.compat import patch_mmengine

    path = REPO / "configs/segmentation/upernet_convnext-t_ade20k-512.py"
    _load(path)
    backbone_cfg = Config.fromfile(str(path)).model.backbone
    torch.manual_seed(1)
    source = MODELS.build(backbone_cfg)
    ckpt = tmp_path / "convnext-tiny_in1k.pth"
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["head.fc.weight"] = torch.zeros(1000, 768)  # a classifier checkpoint also holds its head
    torch.save({"state_dict": state, "meta": {"epoch": np.int64(300)}}, ckpt)

    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict(
        {
            "model.backbone.init_cfg.type": "Pretrained",
            "model.backbone.init_cfg.prefix": "backbone.",
            "model.backbone.init_cfg.checkpoint": str(ckpt),
        }
    )
    patch_mmengine()
    torch.manual_seed(2)
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[k], v, msg=k)
