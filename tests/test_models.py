"""SAM-style mask heads (densevision.models): both configs built and run on CPU at small, awkward sizes with real
mmdet / mmseg data samples (empty ground truth included), the batched decoder against SAM's own per-image path,
and strict loading of official SAM checkpoints written here in the real key layout."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData, PixelData

from densevision.errors import CheckpointError, ConfigError
from densevision.models import (
    BoxPromptedInstanceSegmentor,
    SamBoxMaskHead,
    SamPromptDecoder,
    SamSemanticHead,
    jitter_boxes,
    load_sam_weights,
    predict_masks_batched,
)

SEG_CONFIG = "configs/segmentation/samhead_swin-t_fpn_ade20k-512.py"
INST_CONFIG = "configs/instances/dino_swin-t_fpn_samhead_coco.py"
REPO = Path(__file__).resolve().parents[1]

# Swin with narrower stages (a quarter of the width) and fewer classes / queries: the configs' structure, CPU speed.
SWIN_SMALL = {"embed_dims": 24, "num_heads": [1, 2, 4, 8]}
SEG_SMALL = {
    "model.data_preprocessor.size": None,
    "model.data_preprocessor.size_divisor": 32,
    "model.backbone.embed_dims": SWIN_SMALL["embed_dims"],
    "model.backbone.num_heads": SWIN_SMALL["num_heads"],
    "model.neck.in_channels": [48, 96, 192],
    "model.decode_head.num_classes": 4,
    "model.decode_head.prompt_chunk_size": 3,  # chunked + checkpointed as configured, with several chunks
}
INST_SMALL = {
    "model.detector.backbone.embed_dims": SWIN_SMALL["embed_dims"],
    "model.detector.backbone.num_heads": SWIN_SMALL["num_heads"],
    "model.detector.neck.in_channels": [48, 96, 192],
    "model.detector.encoder.num_layers": 2,
    "model.detector.decoder.num_layers": 2,
    "model.detector.num_queries": 30,
    "model.detector.bbox_head.num_classes": 3,
    "model.detector.test_cfg.max_per_img": 20,
}
# Two images of different sizes (not multiples of 32): the second is padded to the first in the batch.
INST_SHAPES = [(72, 88), (64, 80)]


def build(config: str, overrides: dict):
    cfg = Config.fromfile(str(REPO / config))
    cfg.merge_from_dict(overrides)
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == "mmseg":
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def total_loss(model, losses) -> torch.Tensor:
    loss, _ = model.parse_losses(losses)
    return loss


# ----------------------------------------------------------------------------------------------------- registration
def test_registered_once_in_each_registry_and_reimport_is_harmless():
    from mmdet.registry import MODELS as MMDET
    from mmseg.registry import MODELS as MMSEG

    import densevision.models as models

    importlib.reload(models)  # registers again: force=True replaces instead of raising
    assert MMSEG.get("SamSemanticHead") is models.SamSemanticHead
    assert MMDET.get("BoxPromptedInstanceSegmentor") is models.BoxPromptedInstanceSegmentor
    assert MMDET.get("SamBoxMaskHead") is models.SamBoxMaskHead


@pytest.mark.parametrize("config", [SEG_CONFIG, INST_CONFIG])
def test_configs_import_the_models_and_inherit_one_level(config):
    cfg = Config.fromfile(str(REPO / config))
    assert cfg.custom_imports == {"imports": ["densevision.models"], "allow_failed_imports": False}
    assert cfg.find_unused_parameters is True
    bases = Config._get_base_files(str(REPO / config))  # what the file names in _base_
    assert len(bases) == 1
    assert Config._get_base_files(str((REPO / config).parent / bases[0])) == []


# ------------------------------------------------------------------------------------------ batched mask decoding
def test_batched_decoder_matches_sam_per_image():
    """Prompts of three images (3, 0 and 2 prompts) in one pass give what SAM's own predict_masks gives per image."""
    torch.manual_seed(0)
    dec = SamPromptDecoder().eval()
    emb = torch.randn(3, 256, 6, 5)
    sparse = torch.randn(5, 2, 256)
    batch_index = torch.tensor([0, 0, 0, 2, 2])
    dense = dec.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    pe = dec.dense_pe((6, 5))
    with torch.no_grad():
        masks, iou = predict_masks_batched(dec.mask_decoder, emb + dense, pe, sparse, batch_index)
        for b in (0, 2):
            sel = batch_index == b
            ref_m, ref_i = dec.mask_decoder.predict_masks(emb[b : b + 1], pe, sparse[sel], dense)
            torch.testing.assert_close(masks[sel], ref_m, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[sel], ref_i, rtol=1e-4, atol=1e-4)
    assert masks.shape == (5, 4, 24, 20)  # the 4 mask tokens, upscaled 4x


def test_multimask_selection_matches_sam_forward():
    torch.manual_seed(1)
    dec = SamPromptDecoder().eval()
    emb, sparse = torch.randn(1, 256, 4, 4), torch.randn(2, 2, 256)
    with torch.no_grad():
        for multi in (False, True):
            masks, iou = dec(emb, sparse, torch.zeros(2, dtype=torch.long), multimask_output=multi)
            ref_m, ref_i = dec.mask_decoder(
                emb,
                dec.dense_pe((4, 4)),
                sparse,
                dec.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1),
                multimask_output=multi,
            )
            torch.testing.assert_close(masks, ref_m, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou, ref_i, rtol=1e-4, atol=1e-4)


def test_chunked_checkpointed_decoding_equals_one_pass_with_gradients():
    torch.manual_seed(2)
    plain = SamPromptDecoder(with_cp=False).train()
    cp = SamPromptDecoder(with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    emb = torch.randn(2, 256, 4, 6)
    sparse = torch.randn(7, 1, 256)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    grads = []
    for dec, chunk in ((plain, None), (cp, 3)):
        e = emb.clone().requires_grad_(True)
        masks, _ = dec(e, sparse, index, chunk_size=chunk)
        (masks * torch.linspace(-1, 1, masks.numel()).reshape(masks.shape)).sum().backward()
        grads.append((masks.detach(), e.grad, dec.mask_decoder.transformer.layers[0].mlp.lin1.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_box_embedding_normalises_over_the_given_extent():
    """A box at the same relative place of two extents encodes identically (what makes the dense PE agree)."""
    dec = SamPromptDecoder()
    small = dec.embed_boxes(torch.tensor([[9.5, 19.5, 29.5, 39.5]]), (80, 40))
    large = dec.embed_boxes(torch.tensor([[19.5, 39.5, 59.5, 79.5]]), (160, 80))
    torch.testing.assert_close(small, large)


# ------------------------------------------------------------------------------------------------- semantic head
def test_semantic_head_batch_is_per_image():
    """Each image's logits depend on that image only (no cross-image mixing in the batched decoder)."""
    torch.manual_seed(3)
    head = SamSemanticHead([32, 32], [0, 1], num_classes=3, channels=256).eval()
    feats = [torch.randn(2, 32, 6, 7), torch.randn(2, 32, 3, 4)]
    with torch.no_grad():
        both = head(feats)
        one = head([f[1:] for f in feats])
    assert both.shape == (2, 3, 24, 28)
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both[0], both[1])


@pytest.fixture(scope="module")
def seg_model():
    return build(SEG_CONFIG, SEG_SMALL)


def seg_batch(model):
    from mmseg.structures import SegDataSample

    h, w = 72, 88  # padded to 96 x 96 by the preprocessor
    samples = []
    for labelled in (True, False):
        s = SegDataSample(metainfo={"img_shape": (h, w), "ori_shape": (h, w)})
        label = torch.full((1, h, w), 255, dtype=torch.long)  # 255: ignored (ADE's "other" after reduce_zero_label)
        if labelled:
            label[:, :40] = 1
            label[:, 40:, 30:] = 3
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in samples]
    return model.data_preprocessor({"inputs": inputs, "data_samples": samples}, True)


def test_semantic_config_loss_backward_and_predict(seg_model):
    model = seg_model.train()
    model.zero_grad()
    data = seg_batch(model)
    losses = model(**data, mode="loss")
    loss = total_loss(model, losses)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    head = model.decode_head
    for name in (
        "fusion.lateral.0.weight",
        "class_embed.weight",
        "decoder.mask_decoder.transformer.layers.0.mlp.lin1.weight",
    ):
        grad = head.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.backbone.patch_embed.projection.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(**data, mode="predict")
    assert out[0].seg_logits.data.shape == (4, 72, 88)  # cropped back from the 96 x 96 padding
    assert out[1].pred_sem_seg.data.shape == (1, 72, 88)


# ------------------------------------------------------------------------------------------------- instance head
def test_jitter_boxes_stays_in_image_and_ordered():
    torch.manual_seed(4)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 30.0], [0.0, 0.0, 200.0, 5.0]]).repeat(200, 1)
    out = jitter_boxes(boxes, 0.5, 20.0, (40, 60))
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
    assert out[:, 0::2].min() >= 0 and out[:, 0::2].max() <= 60 and out[:, 1::2].max() <= 40
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, 60)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, 40)
    assert (out - clipped).abs().max() <= 20.0 + 1e-4  # max_offset (corner re-ordering keeps the bound)
    assert (out != clipped).any()
    torch.testing.assert_close(jitter_boxes(boxes, 0.0, 20.0, (40, 60)), boxes)


def test_mask_targets_are_area_averaged_on_the_grid_extent():
    from mmdet.structures.mask import BitmapMasks

    m = np.zeros((1, 10, 13), np.uint8)  # an image smaller than the 16 x 16 extent of a 2 x 2 grid at stride 8
    m[0, 0:4, 0:2] = 1  # 8 pixels, all in the first 4 x 4 target cell
    m[0, 8:10, 12:13] = 1  # 2 pixels in cell (2, 3)
    t = SamBoxMaskHead._mask_targets(BitmapMasks(m, 10, 13), np.array([0]), (16, 16), (4, 4), torch.device("cpu"))
    expected = torch.zeros(1, 4, 4)
    expected[0, 0, 0] = 8 / 16
    expected[0, 2, 3] = 2 / 16
    torch.testing.assert_close(t, expected)


def test_mask_head_rejects_strides_that_do_not_match_the_features():
    head = SamBoxMaskHead([256, 256], featmap_strides=[4, 8])
    feats = [torch.randn(1, 256, 9, 11), torch.randn(1, 256, 5, 6)]  # stride 8 and 16 for a 72 x 88 input
    with pytest.raises(ConfigError, match="featmap_strides"):
        head.image_embedding(feats, (72, 88))
    with pytest.raises(ConfigError, match="one entry per fused level"):
        SamBoxMaskHead([256, 256], featmap_strides=[8])


@pytest.fixture(scope="module")
def inst_model():
    return build(INST_CONFIG, INST_SMALL)


def inst_batch(model, labelled=(True, False)):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks

    samples, inputs = [], []
    g = torch.Generator().manual_seed(0)
    for (h, w), has_gt in zip(INST_SHAPES, labelled, strict=True):
        scale = 0.5 if h == INST_SHAPES[0][0] else 1.0  # the first image was resized to half its original size
        s = DetDataSample(
            metainfo={
                "img_shape": (h, w),
                "ori_shape": (round(h / scale), round(w / scale)),
                "scale_factor": (scale, scale),
            }
        )
        gt = InstanceData()
        masks = np.zeros((2 if has_gt else 0, h, w), np.uint8)
        if has_gt:
            masks[0, 10:40, 20:60] = 1
            masks[1, 45:70, 5:30] = 1
        gt.bboxes = torch.tensor([[20.0, 10.0, 60.0, 40.0], [5.0, 45.0, 30.0, 70.0]])[: len(masks)]
        gt.labels = torch.tensor([0, 2])[: len(masks)]
        gt.masks = BitmapMasks(masks, h, w)
        s.gt_instances = gt
        samples.append(s)
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    return model.data_preprocessor({"inputs": inputs, "data_samples": samples}, True)


def test_instance_config_loss_backward_with_an_empty_image(inst_model):
    model = inst_model.train()
    assert isinstance(model, BoxPromptedInstanceSegmentor)
    model.zero_grad()
    losses = model(**inst_batch(model), mode="loss")
    assert {"loss_cls", "loss_bbox", "loss_iou", "loss_mask", "loss_dice", "loss_mask_iou"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_dice"] > 0
    total_loss(model, losses).backward()
    head = model.mask_head
    for name in (
        "fusion.lateral.0.weight",
        "decoder.mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight",
        "decoder.prompt_encoder.point_embeddings.2.weight",  # a box corner
    ):
        grad = head.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.detector.backbone.patch_embed.projection.weight.grad.abs().sum() > 0


def test_instance_loss_without_any_ground_truth(inst_model):
    """No instance in the batch: mask losses are 0 and still reach the head; detector losses as mmdet gives them."""
    model = inst_model.train()
    model.zero_grad()
    losses = model(**inst_batch(model, labelled=(False, False)), mode="loss")
    for key in ("loss_mask", "loss_dice", "loss_mask_iou"):
        assert losses[key].item() == 0.0
    assert losses["loss_cls"] > 0 and losses["loss_bbox"] == 0
    total_loss(model, losses).backward()
    grad = model.mask_head.fusion.lateral[0].weight.grad
    assert grad is not None and grad.abs().sum() == 0


def test_instance_predict_gives_masks_coco_metric_reads(inst_model, tmp_path):
    from mmdet.evaluation import CocoMetric

    model = inst_model.eval()
    data = inst_batch(model)
    with torch.no_grad():
        out = model(**data, mode="predict")
    for sample in out:
        pred = sample.pred_instances
        oh, ow = sample.metainfo["ori_shape"]
        assert pred.masks.dtype == torch.bool and pred.masks.shape == (20, oh, ow)
        assert pred.bboxes.shape == (20, 4) and pred.scores.shape == (20,)
        assert pred.bboxes[:, 0::2].max() <= ow + 1e-3 and pred.bboxes[:, 1::2].max() <= oh + 1e-3
    assert out[0].metainfo["ori_shape"] == (144, 176)
    with torch.no_grad():
        raw = model(**data, mode="tensor")
    assert raw[-1].shape == (2, 256, 9, 11)  # the mask head's embedding: stride 8 of the 72 x 88 batch

    # mmdet's own consumer: CocoMetric(segm) over these predictions and a COCO file for the same images.
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(("a", "b", "c"))]
    images, anns = [], []
    for img_id, sample in enumerate(out, start=1):
        oh, ow = sample.metainfo["ori_shape"]
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": oh, "width": ow})
        anns.append(
            {"id": img_id, "image_id": img_id, "category_id": 1, "bbox": [4, 4, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]}
        )  # fmt: skip
        sample.set_metainfo({"img_id": img_id})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    metric = CocoMetric(ann_file=str(ann_file), metric=["bbox", "segm"])
    metric.dataset_meta = {"classes": ("a", "b", "c")}
    metric.process({}, [s.to_dict() for s in out])
    result = metric.evaluate(len(out))
    assert "coco/segm_mAP" in result and 0.0 <= result["coco/segm_mAP"] <= 1.0


def test_segmentor_refuses_a_non_detr_detector():
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    retinanet = dict(
        type="RetinaNet",
        backbone=dict(type="ResNet", depth=18, out_indices=(1, 2, 3)),
        neck=dict(type="FPN", in_channels=[128, 256, 512], out_channels=64, num_outs=3),
        bbox_head=dict(
            type="RetinaHead",
            num_classes=2,
            in_channels=64,
            feat_channels=64,
            anchor_generator=dict(
                type="AnchorGenerator", octave_base_scale=4, scales_per_octave=1, ratios=[1.0], strides=[8, 16, 32]
            ),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder"),
        ),
    )
    mask_head = dict(type="SamBoxMaskHead", in_channels=[64], featmap_strides=[8])
    with pytest.raises(ConfigError, match="DETR-family"):
        MODELS.build(dict(type="BoxPromptedInstanceSegmentor", detector=retinanet, mask_head=mask_head))


# ------------------------------------------------------------------------------------------------------ SAM weights
KEPT_IMAGE_ENCODER_KEYS = ("image_encoder.pos_embed", "image_encoder.patch_embed.", "image_encoder.neck.")


@pytest.fixture(scope="session")
def sam_state() -> dict[str, torch.Tensor]:
    """An official-layout SAM vit_b state dict (random init): prompt_encoder.* and mask_decoder.* as
    segment_anything builds them, and a few image_encoder.* keys (not used by FPN heads; the rest is left out to
    keep the file small)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(123)
    sam = sam_model_registry["vit_b"]()
    return {
        k: v.clone()
        for k, v in sam.state_dict().items()
        if not k.startswith("image_encoder.") or k.startswith(KEPT_IMAGE_ENCODER_KEYS)
    }


@pytest.fixture(scope="session")
def sam_checkpoint(sam_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b.pth"
    torch.save(sam_state, path)
    return path


def decoder_values_equal(decoder: SamPromptDecoder, state: dict[str, torch.Tensor]) -> bool:
    mine = decoder.state_dict()
    return all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith("image_encoder."))


def test_sam_weights_load_into_the_semantic_head(sam_state, sam_checkpoint):
    torch.manual_seed(5)
    head = SamSemanticHead([64, 64, 64], [0, 1, 2], num_classes=5)
    assert not decoder_values_equal(head.decoder, sam_state)
    not_loaded = load_sam_weights(head, sam_checkpoint)
    assert decoder_values_equal(head.decoder, sam_state)
    expected = {k for k in head.state_dict() if k.startswith(("fusion.", "class_embed."))}
    assert set(not_loaded) == expected and "class_embed.weight" in expected
    assert len(sam_state) - sum(k.startswith("image_encoder.") for k in sam_state) == len(head.decoder.state_dict())


def test_sam_checkpoint_argument_survives_the_models_init_weights(sam_state, sam_checkpoint):
    """Set in the config, the checkpoint loads in init_weights, after the detector's own initialisation."""
    model = build(INST_CONFIG, {**INST_SMALL, "model.mask_head.sam_checkpoint": str(sam_checkpoint)})
    assert decoder_values_equal(model.mask_head.decoder, sam_state)
    seg = build(SEG_CONFIG, {**SEG_SMALL, "model.decode_head.sam_checkpoint": str(sam_checkpoint)})
    assert decoder_values_equal(seg.decode_head.decoder, sam_state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.__setitem__("mask_decoder.iou_token.weight", torch.zeros(1, 128)),
            r"1 mis-shaped: mask_decoder\.iou_token\.weight \(1, 128\) \(model \(1, 256\)\)",
        ),
        (
            lambda s: s.pop("prompt_encoder.no_mask_embed.weight"),
            r"1 missing keys: prompt_encoder\.no_mask_embed\.weight;",
        ),
        (
            lambda s: s.__setitem__("mask_decoder.extra.weight", torch.zeros(1)),
            r"1 unexpected keys: mask_decoder\.extra\.weight;",
        ),
        (lambda s: s.__setitem__("decode_head.conv_seg.weight", torch.zeros(1)), r"outside SAM's layout"),
    ],
)
def test_sam_weights_refuse_a_checkpoint_that_does_not_fit(sam_state, tmp_path, change, message):
    state = dict(sam_state)
    change(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    head = SamBoxMaskHead([256], featmap_strides=[8])
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_sam_weights(head, path)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # nothing half-loaded


def test_sam_weights_refuse_a_decoder_of_other_sizes(sam_checkpoint):
    head = SamBoxMaskHead([64], featmap_strides=[8], embed_dim=128)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_sam_weights(head, sam_checkpoint)
    with pytest.raises(CheckpointError, match="holds 0 SAM prompt decoders"):
        load_sam_weights(torch.nn.Linear(2, 2), sam_checkpoint)
