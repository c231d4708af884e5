# Semantic segmentation with a SAM-style head on ADE20k-format data (150 classes), 512 x 512 crops:
# Swin-T -> FPN (strides 8, 16, 32; 256 channels) -> SamSemanticHead: the levels are fused into one 256-channel
# embedding at stride 8 (a 64 x 64 grid per crop, SAM's own grid size), SAM's dense positional encoding is added,
# and one learned prompt per class runs through SAM's TwoWayTransformer + MaskDecoder to give that class's mask
# (stride 2). Dataset, schedule and runtime come from the one base file.
_base_ = ["../_base_/ade20k_segmentation.py"]
custom_imports = dict(imports=["densevision.models"], allow_failed_imports=False)

crop_size = (512, 512)
num_classes = 150
swin_channels = [96, 192, 384, 768]  # Swin-T stage widths (embed_dims * 2**i), strides 4, 8, 16, 32
swin_out_indices = (1, 2, 3)  # stride 4 is not computed: the head fuses at stride 8
fpn_channels = 256  # SAM's embedding width: its decoder weights need 256
sam_checkpoint = None  # e.g. "checkpoints/sam_vit_b_01ec64.pth": loads the head's prompt encoder / mask decoder

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
        type="SwinTransformer",
        pretrain_img_size=224,
        embed_dims=swin_channels[0],
        patch_size=4,
        window_size=7,
        mlp_ratio=4,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        strides=(4, 2, 2, 2),
        out_indices=swin_out_indices,
        qkv_bias=True,
        qk_scale=None,
        patch_norm=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.3,
        use_abs_pos_embed=False,
        act_cfg=dict(type="GELU"),
        norm_cfg=dict(type="LN", requires_grad=True),
    ),
    neck=dict(
        type="FPN",
        in_channels=[swin_channels[i] for i in swin_out_indices],
        out_channels=fpn_channels,
        num_outs=len(swin_out_indices),
    ),
    decode_head=dict(
        type="SamSemanticHead",
        in_channels=[fpn_channels] * len(swin_out_indices),
        in_index=list(range(len(swin_out_indices))),
        channels=fpn_channels,
        num_classes=num_classes,
        tokens_per_class=1,
        # Each class prompt keeps ~120 MB of decoder activations on a 64 x 64 grid (measured on CPU, float32): 150
        # prompts x 2 crops would hold ~36 GB. With checkpointing, chunks of 16 prompts are recomputed in the
        # backward pass: ~0.3 GB per prompt of the chunk at peak, ~5 GB, for one extra decoder forward.
        prompt_chunk_size=16,
        with_cp=True,
        sam_checkpoint=sam_checkpoint,
        ignore_index=255,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

# Upstream Swin recipe: no weight decay on position tables and norms.
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys=dict(
            absolute_pos_embed=dict(decay_mult=0.0),
            relative_position_bias_table=dict(decay_mult=0.0),
            norm=dict(decay_mult=0.0),
        )
    ),
)
# SAM's point / mask prompt encoders, ambiguity-mask outputs and IoU head are kept (strict weight loading) but get
# no gradient here.
find_unused_parameters = True
