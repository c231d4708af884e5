# DINO (mmdet) on a ConvNeXt-T backbone (mmpretrain) for COCO-format data: the four ConvNeXt stages (strides
# 4..32) mapped to 256 channels by a ChannelMapper neck plus one extra stride-64 level, five feature levels. DINO
# and neck as upstream mmdet configs/dino/dino-5scale_swin-l_8xb2-12e_coco.py; backbone as upstream
# configs/convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py. Optimizer: DINO's (backbone at 0.1 x lr)
# rather than ConvNeXt's layer-wise decay, so that all DETR-family configs here train alike.
# The whole model is written here; data, evaluator, optimizer, schedule and runtime come from the one `_base_`.
# No pretrained weights are named (nothing downloads); start from ImageNet ConvNeXt-T weights (an mmpretrain
# classifier checkpoint) with
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.prefix=backbone.
#   model.backbone.init_cfg.checkpoint=convnext-tiny_in1k.pth
_base_ = ["../_base_/coco_detection.py"]
custom_imports = dict(imports=["mmpretrain.models"], allow_failed_imports=False)
default_scope = "mmdet"
num_classes = 80
num_levels = 5

model = dict(
    type="DINO",
    # Two-stage DINO picks its queries among the encoder tokens, sum over levels of (H / s) x (W / s): inputs
    # need at least about 104 x 104 px for 900 queries.
    num_queries=900,  # num_matching_queries
    with_box_refine=True,
    as_two_stage=True,
    num_feature_levels=num_levels,
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1,
    ),
    backbone=dict(
        type="mmpretrain.ConvNeXt",
        arch="tiny",
        out_indices=[0, 1, 2, 3],
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
    ),
    neck=dict(
        type="ChannelMapper",
        in_channels=[96, 192, 384, 768],
        kernel_size=1,
        out_channels=256,
        act_cfg=None,
        norm_cfg=dict(type="GN", num_groups=32),
        num_outs=num_levels,
    ),
    encoder=dict(
        num_layers=6,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=256, num_levels=num_levels, dropout=0.0),
            ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, ffn_drop=0.0),
        ),
    ),
    decoder=dict(
        num_layers=6,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.0),
            cross_attn_cfg=dict(embed_dims=256, num_levels=num_levels, dropout=0.0),
            ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, ffn_drop=0.0),
        ),
        post_norm_cfg=None,
    ),
    positional_encoding=dict(num_feats=128, normalize=True, offset=0.0, temperature=20),
    bbox_head=dict(
        type="DINOHead",
        num_classes=num_classes,
        sync_cls_avg_factor=True,
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=5.0),
        loss_iou=dict(type="GIoULoss", loss_weight=2.0),
    ),
    dn_cfg=dict(
        label_noise_scale=0.5,
        box_noise_scale=1.0,
        group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=100),
    ),
    train_cfg=dict(
        assigner=dict(
            type="HungarianAssigner",
            match_costs=[
                dict(type="FocalLossCost", weight=2.0),
                dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
                dict(type="IoUCost", iou_mode="giou", weight=2.0),
            ],
        )
    ),
    test_cfg=dict(max_per_img=300),
)

# DINO's augmentation differs from the base's DETR one only in the first resize of the crop branch (no 1333 cap).
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 4200), (500, 4200), (600, 4200)], keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
# DINO also learns from images without objects.
train_dataloader = dict(dataset=dict(filter_cfg=dict(filter_empty_gt=False), pipeline=train_pipeline))
