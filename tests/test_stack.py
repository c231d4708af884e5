"""The OpenMMLab stack that tools/install.sh builds: compiled mmcv ops run and agree with torchvision."""

from __future__ import annotations

import torch
import torchvision


def test_stack_imports():
    import mmcv.ops  # noqa: F401  (compiled extension: fails here if mmcv was built without ops)
    import mmdet.models  # noqa: F401
    import mmseg.models  # noqa: F401
    import openslide  # noqa: F401
    import rasterio  # noqa: F401
    import segment_anything  # noqa: F401

    import densevision  # noqa: F401


def test_training_and_datasets_load_no_image_readers():
    """Training and the dataset tools run where GDAL / OpenSlide are not installed: the package imports them lazily."""
    import subprocess
    import sys

    code = (
        "import sys, densevision, densevision.apis.train, densevision.synthetic.datasets; "
        "print(sorted(m for m in ('rasterio', 'openslide', 'densevision.io') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import densevision; print(densevision.open_image.__module__, densevision.Region.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["densevision.io.open", "Region"]


def _random_boxes(n: int, size: float = 200.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_mmcv_nms_matches_torchvision():
    from mmcv.ops import nms

    boxes = _random_boxes(300)
    scores = torch.rand(300, generator=torch.Generator().manual_seed(1))
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    assert torch.equal(keep.sort().values, expected.sort().values)


def test_mmcv_roi_align_matches_torchvision():
    from mmcv.ops import roi_align

    feats = torch.randn(2, 4, 37, 53, generator=torch.Generator().manual_seed(2))
    boxes = _random_boxes(20, size=30.0)
    rois = torch.cat([torch.arange(20).remainder(2).float()[:, None], boxes], dim=1)
    ours = roi_align(feats, rois, (7, 7), 0.5, 2, "avg", True)
    ref = torchvision.ops.roi_align(feats, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_registries_resolve_the_model_families():
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.utils import register_all_modules as register_det
    from mmseg.registry import MODELS as SEG_MODELS
    from mmseg.utils import register_all_modules as register_seg

    register_det(init_default_scope=False)
    register_seg(init_default_scope=False)
    for name in ("DINO", "DETR", "SwinTransformer", "FPN", "ChannelMapper"):
        assert DET_MODELS.get(name) is not None, name
    for name in ("EncoderDecoder", "UPerHead", "SwinTransformer"):
        assert SEG_MODELS.get(name) is not None, name
