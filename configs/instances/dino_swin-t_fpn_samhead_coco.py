# Instance segmentation on COCO-format data: DINO (4 scales) on Swin-T + ChannelMapper, whose boxes prompt a
# SAM-style mask head on the same neck levels (BoxPromptedInstanceSegmentor). The mask head fuses the stride 8,
# 16, 32 levels into one 256-channel embedding at stride 8 and runs SAM's TwoWayTransformer + MaskDecoder once per
# box; masks come out at stride 2. Training prompts are jittered ground-truth boxes; test prompts are DINO's boxes.
# Dataset, optimizer, schedule and runtime come from the one base file; the pipeline here also loads masks and the
# evaluator also scores segm.
_base_ = ["../_base_/coco_detection.py"]
custom_imports = dict(imports=["densevision.models"], allow_failed_imports=False)

num_classes = 80
swin_channels = [96, 192, 384, 768]  # Swin-T stage widths, strides 4, 8, 16, 32
swin_out_indices = (1, 2, 3)
neck_channels = 256  # DINO's embed dims and SAM's embedding width
neck_strides = [8, 16, 32, 64]  # the three Swin levels + ChannelMapper's extra stride-2 conv
num_levels = len(neck_strides)
mask_levels = 3  # the mask head fuses the three finest levels (strides 8, 16, 32)
sam_checkpoint = None  # e.g. "checkpoints/sam_vit_b_01ec64.pth": loads the mask head's prompt encoder / decoder

model = dict(
    type="BoxPromptedInstanceSegmentor",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1,
    ),
    detector=dict(
        type="DINO",
        num_queries=900,
        with_box_refine=True,
        as_two_stage=True,
        num_feature_levels=num_levels,
        backbone=dict(
            type="SwinTransformer",
            pretrain_img_size=224,
            embed_dims=swin_channels[0],
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=7,
            mlp_ratio=4,
            qkv_bias=True,
            qk_scale=None,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.2,
            patch_norm=True,
            out_indices=swin_out_indices,
            with_cp=False,
            convert_weights=True,
        ),
        neck=dict(
            type="ChannelMapper",
            in_channels=[swin_channels[i] for i in swin_out_indices],
            kernel_size=1,
            out_channels=neck_channels,
            act_cfg=None,
            norm_cfg=dict(type="GN", num_groups=32),
            num_outs=num_levels,
        ),
        encoder=dict(
            num_layers=6,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=neck_channels, num_levels=num_levels, dropout=0.0),
                ffn_cfg=dict(embed_dims=neck_channels, feedforward_channels=2048, ffn_drop=0.0),
            ),
        ),
        decoder=dict(
            num_layers=6,
            return_intermediate=True,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=neck_channels, num_heads=8, dropout=0.0),
                cross_attn_cfg=dict(embed_dims=neck_channels, num_levels=num_levels, dropout=0.0),
                ffn_cfg=dict(embed_dims=neck_channels, feedforward_channels=2048, ffn_drop=0.0),
            ),
            post_norm_cfg=None,
        ),
        positional_encoding=dict(num_feats=neck_channels // 2, normalize=True, offset=0.0, temperature=20),
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
    ),
    mask_head=dict(
        type="SamBoxMaskHead",
        in_channels=[neck_channels] * mask_levels,
        featmap_strides=neck_strides[:mask_levels],
        in_index=list(range(mask_levels)),
        embed_dim=neck_channels,
        box_jitter=0.1,  # SAM: std 10% of the side, at most 20 px
        box_jitter_max=20.0,
        # An 800 x 1333 input gives a 100 x 167 grid: ~0.5 GB of decoder activations per prompt (float32), so 16
        # prompts per image; set with_cp=True to recompute them chunk by chunk on smaller GPUs.
        max_prompts_per_image=16,
        loss_bce_weight=5.0,
        loss_dice_weight=5.0,
        loss_iou_weight=1.0,
        prompt_chunk_size=64,
        with_cp=False,
        sam_checkpoint=sam_checkpoint,
    ),
)

backend_args = None
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=[(s, 1333) for s in range(480, 801, 32)], keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_evaluator = dict(metric=["bbox", "segm"])
test_evaluator = dict(metric=["bbox", "segm"])

# SAM's point / mask prompt encoders and ambiguity-mask outputs are kept (strict weight loading) but get no gradient.
find_unused_parameters = True
