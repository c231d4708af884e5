# UperNet on a ConvNeXt-T backbone (mmpretrain) for ADE20k-format data (150 classes), 512 x 512 crops, as upstream
# mmseg convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py. The whole model is written here; data, evaluator,
# schedule and runtime come from the one `_base_`. No pretrained weights are named (nothing downloads); start from
# ImageNet ConvNeXt-T weights (an mmpretrain classifier checkpoint) with
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.prefix=backbone.
#   model.backbone.init_cfg.checkpoint=convnext-tiny_in1k.pth
_base_ = ["../_base_/ade20k_segmentation.py"]
custom_imports = dict(imports=["mmpretrain.models"], allow_failed_imports=False)
default_scope = "mmseg"
crop_size = (512, 512)
num_classes = 150
norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN in the upstream config; BN also runs on one GPU or the CPU

data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="mmpretrain.ConvNeXt",
        arch="tiny",
        out_indices=[0, 1, 2, 3],
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[96, 192, 384, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

# AdamW with stage-wise learning-rate decay (upstream). Upstream trains in fp16 (AmpOptimWrapper), which mmengine
# only builds on a GPU: here the wrapper is the plain one, and `--amp` (densevision train / tools/train.py) turns
# mixed precision on where a GPU is present.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(decay_rate=0.9, decay_type="stage_wise", num_layers=6),
    constructor="LearningRateDecayOptimizerConstructor",
)
