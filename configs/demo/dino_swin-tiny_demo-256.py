# A small DINO for `densevision demo` (densevision/demo): the project's Swin-T DINO with a narrow, shallow Swin
# (width 32, one block per stage), one encoder and two decoder layers, so that it learns the demo's planted
# objects from scratch in a few CPU minutes (DINO's decoder hard-codes 128 sine features per coordinate, so the
# transformer stays 256 wide). Trained on 256 x 256 crops at the scene's full resolution, without rescaling: the
# demo detects at that same scale, tile by tile. Classes come from the data (the COCO categories).
_base_ = ["../detection/dino_swin-t_fpn_coco.py"]
crop_size = (256, 256)
# Four feature levels (strides 8, 16, 32 and 64: upstream's "4scale" DINO) instead of five: the stride-4 level
# would hold three quarters of the encoder's tokens, and the planted objects are 24 px and larger.
num_levels = 4
model = dict(
    num_queries=100,
    num_feature_levels=num_levels,
    backbone=dict(
        embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0, out_indices=(1, 2, 3)
    ),
    neck=dict(in_channels=[64, 128, 256], num_outs=num_levels),
    encoder=dict(
        num_layers=1,
        layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels), ffn_cfg=dict(feedforward_channels=256)),
    ),
    decoder=dict(
        num_layers=2,
        layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels), ffn_cfg=dict(feedforward_channels=256)),
    ),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=30)),
    test_cfg=dict(max_per_img=100),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=crop_size, keep_ratio=True),  # the crops' own size: sets scale_factor (1, 1)
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(custom_keys=dict(backbone=dict(lr_mult=1.0))))
