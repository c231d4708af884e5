# DETR (mmdet) on a ConvNeXt-T backbone (mmpretrain) for COCO-format data: the last ConvNeXt stage (stride 32)
# mapped to 256 channels by a ChannelMapper, plain multi-head attention (no deformable attention), as upstream mmdet
# configs/detr/detr_r50_8xb2-150e_coco.py with the ResNet-50 swapped for ConvNeXt-T (backbone as upstream
# configs/convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py, but out_indices [3]: DETR reads one level,
# and unused stage norms would break DistributedDataParallel).
# The whole model is written here; data, evaluator, optimizer and runtime come from the one `_base_`; the schedule
# is DETR's 150 epochs.
# No pretrained weights are named (nothing downloads); start from ImageNet ConvNeXt-T weights (an mmpretrain
# classifier checkpoint) with
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.prefix=backbone.
#   model.backbone.init_cfg.checkpoint=convnext-tiny_in1k.pth
_base_ = ["../_base_/coco_detection.py"]
custom_imports = dict(imports=["mmpretrain.models"], allow_failed_imports=False)
default_scope = "mmdet"
num_classes = 80

model = dict(
    type="DETR",
    num_queries=100,
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
        out_indices=[3],
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
    ),
    neck=dict(
        type="ChannelMapper",
        in_channels=[768],
        kernel_size=1,
        out_channels=256,
        act_cfg=None,
        norm_cfg=None,
        num_outs=1,
    ),
    encoder=dict(
        num_layers=6,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.1, batch_first=True),
            ffn_cfg=dict(
                embed_dims=256,
                feedforward_channels=2048,
                num_fcs=2,
                ffn_drop=0.1,
                act_cfg=dict(type="ReLU", inplace=True),
            ),
        ),
    ),
    decoder=dict(
        num_layers=6,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.1, batch_first=True),
            cross_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.1, batch_first=True),
            ffn_cfg=dict(
                embed_dims=256,
                feedforward_channels=2048,
                num_fcs=2,
                ffn_drop=0.1,
                act_cfg=dict(type="ReLU", inplace=True),
            ),
        ),
        return_intermediate=True,
    ),
    positional_encoding=dict(num_feats=128, normalize=True),
    bbox_head=dict(
        type="DETRHead",
        num_classes=num_classes,
        embed_dims=256,
        loss_cls=dict(type="CrossEntropyLoss", bg_cls_weight=0.1, use_sigmoid=False, loss_weight=1.0, class_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=5.0),
        loss_iou=dict(type="GIoULoss", loss_weight=2.0),
    ),
    train_cfg=dict(
        assigner=dict(
            type="HungarianAssigner",
            match_costs=[
                dict(type="ClassificationCost", weight=1.0),
                dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
                dict(type="IoUCost", iou_mode="giou", weight=2.0),
            ],
        )
    ),
    test_cfg=dict(max_per_img=100),
)

# DETR's 150-epoch schedule (upstream detr_r50_8xb2-150e_coco.py).
max_epochs = 150
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[100], gamma=0.1)]
