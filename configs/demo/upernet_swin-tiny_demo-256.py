# A small UperNet for `densevision demo` (densevision/demo): the project's Swin-T UperNet with a narrow, shallow
# Swin (width 32, one block per stage) and a narrow head, so that it learns the demo's planted regions from
# scratch in a few CPU minutes. Trained on 256 x 256 crops at the slide's full resolution, without rescaling: the
# demo segments at that same scale (level 0), tile by tile. Classes come from the data (objectInfo*.txt).
_base_ = ["../segmentation/upernet_swin-t_ade20k-512.py"]
crop_size = (256, 256)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=32, dropout_ratio=0.0),
    auxiliary_head=dict(in_channels=128, channels=16, dropout_ratio=0.0),
    test_cfg=dict(mode="whole"),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=2e-3))
# Warmup over the first 5% of the run, then linear decay (in iterations of the base's 160k schedule, which
# `densevision train --max-iters` compresses to the run: the base's 1500-iteration warmup would shrink to a single
# iteration in a short run and leave the learning rate at its warmup start).
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=8000),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=8000, end=160000, by_epoch=False),
]
