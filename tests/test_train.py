"""Training and evaluation on generated COCO / ADE20k data through densevision.apis.train and tools/*.py:
the loss falls, test() reports the COCO mAP that pycocotools computes and the mIoU that counting pixels gives
(100 where the labels are the model's predictions, 0 where every label is another class), checkpoints load in
mmdet's init_detector and in MMSegPredictor, --resume continues where the last checkpoint stopped, bad data stops
the run before anything is built, the schedule compresses to hand-computed iterations, and torchrun trains on two
CPU processes.

The models are the repository's configs with small widths and depths (tiny configs below, one `_base_` each), on
96 x 96 px images, so that a run takes seconds."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densevision.apis.train import test as evaluate
from densevision.apis.train import train
from densevision.errors import CheckpointError, ConfigError, DatasetError
from densevision.synthetic.datasets import make_ade_dataset, make_coco_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 96

# DINO with one encoder and two decoder layers over a 4-stage Swin of width 32. DINO's decoder hard-codes 128 sine
# features per coordinate, so the transformer stays 256 wide.
TINY_DINO = f"""
_base_ = ["{REPO}/configs/detection/dino_swin-t_fpn_coco.py"]
model = dict(
    num_queries=30,
    backbone=dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0),
    neck=dict(in_channels=[32, 64, 128, 256]),
    encoder=dict(num_layers=1, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
    decoder=dict(num_layers=2, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=10)),
    test_cfg=dict(max_per_img=30),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=({SIZE}, {SIZE}), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(custom_keys=dict(backbone=dict(lr_mult=1.0))))
"""

# UperNet over the same small Swin; no dropout, so a resumed run repeats the uninterrupted one exactly.
TINY_UPERNET = f"""
_base_ = ["{REPO}/configs/segmentation/upernet_swin-t_ade20k-512.py"]
model = dict(
    data_preprocessor=dict(size=({SIZE}, {SIZE})),
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
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=5e-3))
"""

RUN = dict(num_workers=0, batch_size=2, seed=0)


def _tool(name: str):
    """tools/<name>.py as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), num_train=16, num_val=4, image_size=SIZE)


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return make_ade_dataset(tmp_path_factory.mktemp("ade"), num_train=16, num_val=4, image_size=SIZE)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    return {"dino": _write(d / "tiny_dino.py", TINY_DINO), "upernet": _write(d / "tiny_upernet.py", TINY_UPERNET)}


@pytest.fixture(scope="module")
def dino_run(coco, configs, tmp_path_factory):
    work = tmp_path_factory.mktemp("dino")
    return train(configs["dino"], work_dir=work, data_root=coco.root, max_iters=12, **RUN)


@pytest.fixture(scope="module")
def upernet_run(ade, configs, tmp_path_factory):
    work = tmp_path_factory.mktemp("upernet")
    return train(configs["upernet"], work_dir=work, data_root=ade.root, max_iters=8, checkpoint_interval=4, **RUN)


@pytest.fixture(scope="module")
def dino_detections(dino_run, tmp_path_factory):
    """test() of the DINO run's last checkpoint, with mmdet's CocoMetric keeping its COCO results JSON."""
    d = tmp_path_factory.mktemp("dino_dets")
    options = {"test_evaluator.outfile_prefix": str(d / "dets")}
    metrics = evaluate(dino_run["config"], dino_run["checkpoint"], work_dir=d, cfg_options=options, num_workers=0)
    return metrics, json.loads((d / "dets.bbox.json").read_text())


@pytest.fixture(scope="module")
def upernet_predictions(upernet_run, tmp_path_factory):
    """test() of the UperNet run's last checkpoint, with mmseg's IoUMetric writing each prediction as an ADE label
    map (raw values: class k as k + 1) named as its image."""
    d = tmp_path_factory.mktemp("upernet_pred")
    options = {"test_evaluator.output_dir": str(d / "pred")}
    metrics = evaluate(upernet_run["config"], upernet_run["checkpoint"], work_dir=d, cfg_options=options, num_workers=0)
    return metrics, d / "pred"


def _coco_reference(ann_file: Path, detections: list[dict]) -> dict[str, float]:
    """bbox mAP, mAP@50, mAP@75 of COCO results by pycocotools directly."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        e = COCOeval(gt, gt.loadRes(detections), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return {"coco/bbox_mAP": e.stats[0], "coco/bbox_mAP_50": e.stats[1], "coco/bbox_mAP_75": e.stats[2]}


def _miou_reference(pred_dir: Path, label_dir: Path, k: int) -> dict[str, float]:
    """mIoU, aAcc, mAcc (percent) by counting pixels of ADE label maps (raw 0 and 255 ignored, 1..k the classes)
    over the whole split, as mmseg's IoUMetric defines them: a class with no label and no prediction is left out."""
    inter, union, area = np.zeros(k), np.zeros(k), np.zeros(k)
    for label_path in sorted(label_dir.glob("*.png")):
        label = np.asarray(Image.open(label_path)).astype(int) - 1
        pred = np.asarray(Image.open(pred_dir / label_path.name)).astype(int) - 1
        valid = (label >= 0) & (label < k)
        for c in range(k):
            p, t = (pred == c) & valid, (label == c) & valid
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
            area[c] += t.sum()
    with np.errstate(invalid="ignore"):
        return {
            "mIoU": 100 * np.nanmean(inter / union),
            "aAcc": 100 * inter.sum() / area.sum(),
            "mAcc": 100 * np.nanmean(inter / area),
        }


def _falls(losses: list[float], k: int = 3) -> bool:
    return bool(np.mean(losses[-k:]) < 0.9 * np.mean(losses[:k]))


def test_detection_training(dino_run, dino_detections, coco):
    r = dino_run
    assert r["iterations"] == 12 and len(r["losses"]) == 12 and all(np.isfinite(r["losses"]))
    assert len(r["iteration_seconds"]) == 12 and all(s > 0 for s in r["iteration_seconds"])
    assert _falls(r["losses"]), r["losses"]
    assert r["classes"] == list(coco.classes) and r["class_source"] == "data"  # not COCO's 80
    assert r["images"] == {"train": 16, "val": 4}
    assert Path(r["checkpoint"]).name == "iter_12.pth"
    # Validation at the end of the run scored the final model: pycocotools on that model's detections agrees.
    reference = _coco_reference(coco.files["val"], dino_detections[1])
    assert r["metrics"]["coco/bbox_mAP"] == pytest.approx(reference["coco/bbox_mAP"], abs=6e-4)
    saved = Path(r["config"]).read_text()  # the resolved config in the work dir
    assert "num_classes=3" in saved and str(coco.root) in saved and "'triangle'" in saved


def test_detection_checkpoint_loads_in_init_detector(dino_run, coco):
    from mmdet.apis import inference_detector, init_detector

    from densevision.compat import load_checkpoint, patch_mmengine

    patch_mmengine()  # mmengine checkpoints carry numpy / HistoryBuffer metadata: the safe loader allows them
    model = init_detector(dino_run["config"], dino_run["checkpoint"], device="cpu")
    assert model.dataset_meta["classes"] == coco.classes
    state = load_checkpoint(dino_run["checkpoint"])["state_dict"]
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    image = np.asarray(Image.open(coco.root / "images" / "val_000000.jpg"))[..., ::-1]  # BGR, as mmdet reads
    result = inference_detector(model, np.ascontiguousarray(image))
    assert len(result.pred_instances) == 30 and (result.pred_instances.labels < 3).all()


def test_detection_test_reports_coco_map(dino_run, dino_detections, coco, tmp_path):
    """test()'s mAP is pycocotools' on the model's detections; with those detections as the ground truth
    (a second data root) it is 1, as only an evaluation of this model against that root's annotations gives."""
    out = tmp_path / "metrics.json"
    metrics = evaluate(dino_run["config"], dino_run["checkpoint"], work_dir=tmp_path / "w", out=out, num_workers=0)
    reference = _coco_reference(coco.files["val"], dino_detections[1])
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, abs=6e-4), key  # mmdet rounds to 3 decimals
    assert metrics["coco/bbox_mAP"] == pytest.approx(dino_run["metrics"]["coco/bbox_mAP"])  # same model, same data
    record = json.loads(out.read_text())
    assert record["metrics"] == metrics and record["classes"] == ["disc", "square", "triangle"]

    root = tmp_path / "answers"
    shutil.copytree(coco.root, root)
    ann = json.loads(coco.files["val"].read_text())
    ann["annotations"] = [
        {
            "id": i,
            "image_id": d["image_id"],
            "category_id": d["category_id"],
            "bbox": d["bbox"],
            "iscrowd": 0,
            "area": d["bbox"][2] * d["bbox"][3],
        }
        for i, d in enumerate(dino_detections[1], start=1)
    ]
    (root / coco.files["val"].relative_to(coco.root)).write_text(json.dumps(ann))
    perfect = evaluate(dino_run["config"], dino_run["checkpoint"], data_root=root, work_dir=tmp_path / "w")
    assert perfect["coco/bbox_mAP"] == 1.0 and perfect["coco/bbox_mAP_75"] == 1.0


def test_segmentation_training(upernet_run, upernet_predictions, ade):
    r = upernet_run
    assert r["iterations"] == 8 and len(r["losses"]) == 8 and _falls(r["losses"]), r["losses"]
    assert r["classes"] == list(ade.classes) and r["class_source"] == "data"  # from objectInfo4.txt
    # Validation at the end of the run scored the final model: counting its predicted pixels gives the same mIoU.
    reference = _miou_reference(upernet_predictions[1], ade.root / "annotations/validation", len(ade.classes))
    assert r["metrics"]["mIoU"] == pytest.approx(reference["mIoU"], abs=0.006)  # mmseg rounds to 2 decimals
    work = Path(r["work_dir"])
    assert (work / "iter_4.pth").is_file() and Path(r["checkpoint"]) == work / "iter_8.pth"
    saved = Path(r["config"]).read_text()
    assert "type='BaseSegDataset'" in saved and "reduce_zero_label=True" in saved  # ADE's 150 names are not ours


def test_segmentation_checkpoint_loads_in_the_predictor(upernet_run, upernet_predictions, ade):
    """The predictor with the trained weights predicts what mmseg's own test loop predicted with them, pixel for
    pixel, on every validation image."""
    from densevision.predictors.mmseg import MMSegPredictor

    predictor = MMSegPredictor.from_config(upernet_run["config"], upernet_run["checkpoint"])
    assert predictor.class_names == ade.classes and predictor.num_classes == 4
    for path in sorted((ade.root / "images/validation").glob("*.jpg")):
        tile = torch.from_numpy(np.asarray(Image.open(path)).copy())
        logits = predictor(tile.permute(2, 0, 1)[None].float())
        assert logits.shape == (1, 4, SIZE, SIZE)
        expected = np.asarray(Image.open(upernet_predictions[1] / f"{path.stem}.png")).astype(int) - 1
        np.testing.assert_array_equal(logits[0].argmax(0).numpy(), expected, err_msg=path.name)


def test_segmentation_test_reports_miou(upernet_run, upernet_predictions, ade, configs, tmp_path):
    """test()'s mIoU, aAcc and mAcc are those of counting the pixels its predictions got right."""
    metrics, predictions = upernet_predictions
    labels = ade.root / "annotations/validation"
    assert sorted(p.name for p in predictions.iterdir()) == sorted(p.name for p in labels.glob("*.png"))
    reference = _miou_reference(predictions, labels, len(ade.classes))
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, abs=0.006), key  # mmseg rounds to 2 decimals
    assert metrics["mIoU"] == pytest.approx(upernet_run["metrics"]["mIoU"])
    # The tiny config itself (not the saved one) with the data root: classes come from the checkpoint.
    again = evaluate(configs["upernet"], upernet_run["checkpoint"], data_root=ade.root, work_dir=tmp_path)
    assert again["mIoU"] == pytest.approx(metrics["mIoU"])


@pytest.mark.parametrize("shift,expected", [(0, 100.0), (1, 0.0)])
def test_miou_is_100_on_labels_equal_to_the_predictions_and_0_on_them_shifted_a_class(
    shift, expected, upernet_run, upernet_predictions, ade, tmp_path
):
    """Label maps replaced by the model's own predictions give mIoU, aAcc and mAcc 100; shifted to the next class
    (k -> k + 1 mod K), so that no pixel is right, 0."""
    root = tmp_path / "data"
    shutil.copytree(ade.root, root)
    k = len(ade.classes)
    for path in upernet_predictions[1].iterdir():
        raw = np.asarray(Image.open(path)).astype(int)  # 1..k
        Image.fromarray(((raw - 1 + shift) % k + 1).astype(np.uint8)).save(root / "annotations/validation" / path.name)
    metrics = evaluate(upernet_run["config"], upernet_run["checkpoint"], data_root=root, work_dir=tmp_path)
    assert (metrics["mIoU"], metrics["aAcc"], metrics["mAcc"]) == (expected, expected, expected)


def test_tools_test(upernet_run, tmp_path, capsys):
    main = _tool("test").main
    config, checkpoint = upernet_run["config"], upernet_run["checkpoint"]
    out = tmp_path / "m.json"
    assert main([config, checkpoint, "--out", str(out), "--work-dir", str(tmp_path), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU: " in printed and f"metrics: {out}" in printed
    assert json.loads(out.read_text())["metrics"]["mIoU"] == pytest.approx(upernet_run["metrics"]["mIoU"])
    assert main([config, str(tmp_path / "none.pth"), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such checkpoint file" in err, err


def test_densevision_train_and_test_commands(ade, configs, tmp_path, capsys):
    """The CLI's train / test are the tools' code with -c / -w / -o; bad input is one line and exit 2."""
    from densevision.cli import main

    work = tmp_path / "work"
    args = ["train", "-c", str(configs["upernet"]), "--data-root", str(ade.root), "--work-dir", str(work)]
    assert main([*args, "--max-iters", "2", "--num-workers", "0", "--batch-size", "2", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    checkpoint = work / "iter_2.pth"
    assert f"checkpoint: {checkpoint}" in printed and "iterations: 2" in printed, printed
    out = tmp_path / "metrics.json"
    config = work / Path(configs["upernet"]).name  # the resolved config the run saved
    args = ["test", "-c", str(config), "-w", str(checkpoint), "-o", str(out), "--work-dir", str(tmp_path)]
    assert main([*args, "--num-workers", "0"]) == 0
    assert "mIoU: " in capsys.readouterr().out and "mIoU" in json.loads(out.read_text())["metrics"]
    assert main(["train", "-c", str(configs["upernet"]), "--data-root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densevision: error: ") and "no such dataset folder" in err and "\n" not in err, err


def test_test_refuses_a_checkpoint_of_another_model(upernet_run, tmp_path):
    """Strict loading: a model of other widths does not take the weights (mmengine would only warn)."""
    with pytest.raises(CheckpointError, match=r"does not fit the model .*size mismatch for decode_head"):
        evaluate(
            upernet_run["config"],
            upernet_run["checkpoint"],
            cfg_options={"model.decode_head.channels": 16},
            work_dir=tmp_path,
            num_workers=0,
        )


def test_resume_continues_from_the_last_checkpoint(upernet_run, ade, configs, tmp_path):
    """An interrupted run (only iter_4 written) resumed with tools/train.py --resume does iterations 5..8 and
    ends where the uninterrupted run ended."""
    main = _tool("train").main
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(Path(upernet_run["work_dir"]) / "iter_4.pth", work / "iter_4.pth")
    (work / "last_checkpoint").write_text(str(work / "iter_4.pth"))
    args = [str(configs["upernet"]), "--work-dir", str(work), "--data-root", str(ade.root), "--resume"]
    args += ["--max-iters", "8", "--num-workers", "0", "--batch-size", "2", "--seed", "0"]
    assert main(args) == 0
    assert (work / "iter_8.pth").is_file()
    log = next(work.glob("*/*.log")).read_text()
    assert "resumed epoch: 0, iter: 4" in log and "Iter(train) [8/8]" in log
    from densevision.compat import load_checkpoint

    resumed = load_checkpoint(work / "iter_8.pth")
    straight = load_checkpoint(Path(upernet_run["work_dir"]) / "iter_8.pth")
    assert resumed["meta"]["iter"] == 8
    for k, v in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, msg=k)


def test_runs_of_one_config_in_the_same_second_keep_their_own_logs(ade, configs, tmp_path, monkeypatch):
    """mmengine names a run <config>_<second> and keeps its logger by that name: a second run in the same second
    logged into the first run's file (seen as a flaky resume test)."""
    import time

    second = time.strftime("%Y%m%d_%H%M%S")
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: second)
    for name in ("first", "second"):
        train(configs["upernet"], work_dir=tmp_path / name, data_root=ade.root, max_iters=1, **RUN)
    for name in ("first", "second"):
        log = (tmp_path / name / second / f"{second}.log").read_text()
        assert f"work_dir = '{tmp_path / name}'" in log


def test_resume_without_a_checkpoint(ade, configs, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(configs["upernet"], work_dir=tmp_path, data_root=ade.root, resume=True, max_iters=2, **RUN)


def test_config_classes_must_cover_the_data(coco, configs, tmp_path):
    """A config that names its classes keeps them; data with other categories is refused before training."""
    work = tmp_path / "work"
    options = {"train_dataloader.dataset.metainfo": dict(classes=("disc", "square"))}
    with pytest.raises(DatasetError, match=r"category ids 3 \('triangle'.* not among the config's classes"):
        train(configs["dino"], work_dir=work, data_root=coco.root, cfg_options=options, max_iters=1, **RUN)
    assert not work.exists()


def _break_coco_key(root: Path) -> None:
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    del data["annotations"][0]["bbox"]
    ann.write_text(json.dumps(data))


def _break_coco_image(root: Path) -> None:
    next((root / "images").glob("train_*.jpg")).unlink()


def _break_coco_val_category(root: Path) -> None:
    ann = root / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 9, "name": "hexagon"})
    data["annotations"][0]["category_id"] = 9
    ann.write_text(json.dumps(data))


def _break_ade_size(root: Path) -> None:
    Image.fromarray(np.zeros((SIZE, SIZE + 3), np.uint8)).save(root / "annotations/validation/ADE_val_00000002.png")


def _break_ade_images(root: Path) -> None:
    for p in (root / "images/training").glob("*.jpg"):
        p.unlink()


@pytest.mark.parametrize(
    "kind,corrupt,message",
    [
        ("coco", _break_coco_key, "annotations id 1 lacks 'bbox'"),
        ("coco", _break_coco_image, "1 of 16 images do not exist"),
        ("coco", _break_coco_val_category, "category ids 9 ('hexagon', 1 annotations) are not among"),
        ("ade", _break_ade_size, "ADE_val_00000002.png: label map is 99 x 96 px but its image is 96 x 96"),
        ("ade", _break_ade_images, "no *.jpg images"),
    ],
)
def test_bad_data_stops_before_training(kind, corrupt, message, coco, ade, configs, tmp_path, capsys):
    """tools/train.py prints one line and exits 2; nothing is built (the work dir holds at most the command's log)."""
    main = _tool("train").main
    root = tmp_path / "data"
    shutil.copytree((coco if kind == "coco" else ade).root, root)
    corrupt(root)
    config = configs["dino" if kind == "coco" else "upernet"]
    work = tmp_path / "work"
    assert main([str(config), "--work-dir", str(work), "--data-root", str(root), "--max-iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    built = [p.name for p in work.rglob("*") if p.suffix != ".log"] if work.exists() else []
    assert built == []  # no config saved, no run folder, no checkpoint: at most the command's log


def test_training_without_validation_data(ade, configs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ade.root, root)
    shutil.rmtree(root / "images" / "validation")
    with pytest.raises(DatasetError, match="validation data; to train without it: --cfg-options val_cfg=None"):
        train(configs["upernet"], work_dir=tmp_path / "a", data_root=root, max_iters=1, **RUN)
    options = {"val_cfg": None, "val_dataloader": None, "val_evaluator": None}
    r = train(configs["upernet"], work_dir=tmp_path / "b", data_root=root, cfg_options=options, max_iters=1, **RUN)
    assert r["iterations"] == 1 and r["images"] == {"train": 16} and r["metrics"] == {}


def test_usage_errors(ade, configs, tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a shipped config name"):
        train(tmp_path / "nope.py", work_dir=tmp_path)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        train(configs["upernet"], work_dir=tmp_path, data_root=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="torchrun"):
        train(configs["upernet"], work_dir=tmp_path, data_root=ade.root, launcher="pytorch")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--amp needs a CUDA GPU"):
            train(configs["upernet"], work_dir=tmp_path, data_root=ade.root, amp=True)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(ade, configs, tmp_path):
    """torchrun --nproc_per_node 2 tools/train.py --launcher pytorch: gloo on the CPU, both ranks step together."""
    work = tmp_path / "work"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [str(REPO / "tools/train.py"), str(configs["upernet"]), "--launcher", "pytorch"]
    args += ["--work-dir", str(work), "--data-root", str(ade.root), "--max-iters", "6", "--num-workers", "0"]
    args += ["--batch-size", "2", "--seed", "0", "--cfg-options", "default_hooks.logger.interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-12000:]  # a rank's fatal-error stacks, then torchrun's report
    assert (work / "iter_6.pth").is_file()
    log = next(work.glob("*/*.log")).read_text()
    assert "Distributed launcher: pytorch" in log and "Distributed training: True" in log
    losses = [float(line.split("  loss: ")[1].split()[0]) for line in log.splitlines() if "Iter(train)" in line]
    # Rank 0's window-averaged loss falls at every step, as it does in one process.
    assert len(losses) == 6 and (np.diff(losses) < 0).all(), losses
    assert proc.stdout.count("checkpoint: ") == 1  # rank 0 reports


@pytest.mark.parametrize("max_iters,warmup_end", [(50, None), (200, None), (2000, 19)])
def test_schedule_compressed_to_max_iters(max_iters, warmup_end):
    """UperNet's 1500-iteration warmup of 160k iterations shrinks with the run; one too short to ramp is dropped
    (mmengine's LinearLR stops a step short of its end factor: a 2-iteration warmup would halve the whole run's lr)."""
    from densevision.configs import load_config
    from densevision.training.schedule import compress_schedule

    cfg = load_config(REPO / "configs" / "segmentation" / "upernet_swin-t_ade20k-512.py")
    compress_schedule(cfg, max_iters)
    kinds = {s["type"]: s for s in cfg.param_scheduler}
    assert ("LinearLR" in kinds) == (warmup_end is not None)
    if warmup_end is not None:
        assert (kinds["LinearLR"]["begin"], kinds["LinearLR"]["end"]) == (0, warmup_end)
    assert kinds["PolyLR"]["end"] == max_iters and not kinds["PolyLR"]["by_epoch"]
    assert cfg.train_cfg == {"type": "IterBasedTrainLoop", "max_iters": max_iters, "val_interval": max_iters}


def test_epoch_schedule_compressed_to_hand_computed_iterations():
    """12 epochs into 300 iterations: epoch positions scale by 300 / 12 = 25 (milestones 8, 11 -> 200, 275; T_max
    12 -> 300), an iteration-based warmup keeps its 100 iterations, one of 6 iterations is dropped (shorter than
    MIN_WARMUP), and one that begins after the run (iteration 400) has no iteration left."""
    from mmengine.config import Config

    from densevision.errors import ConfigError
    from densevision.training.schedule import MIN_WARMUP, compress_schedule

    assert MIN_WARMUP == 10
    cfg = Config(
        dict(
            train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=12, val_interval=1),
            param_scheduler=[
                dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=100),
                dict(type="ConstantLR", factor=0.5, by_epoch=False, begin=0, end=6),
                dict(type="MultiStepLR", begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
                dict(type="CosineAnnealingLR", T_max=12, begin=0, end=12, by_epoch=True, convert_to_iter_based=True),
                dict(type="LinearLR", by_epoch=False, begin=400, end=500),
            ],
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1), logger=dict(type="LoggerHook")),
        )
    )
    compress_schedule(cfg, 300)
    got = [(s["type"], s["begin"], s["end"], s.get("milestones"), s.get("T_max")) for s in cfg.param_scheduler]
    assert got == [
        ("LinearLR", 0, 100, None, None),
        ("MultiStepLR", 0, 300, [200, 275], None),
        ("CosineAnnealingLR", 0, 300, None, 300),
    ]
    assert all(s["by_epoch"] is False and "convert_to_iter_based" not in s for s in cfg.param_scheduler)
    assert cfg.train_cfg == {"type": "IterBasedTrainLoop", "max_iters": 300, "val_interval": 300}
    assert cfg.default_hooks.checkpoint == {"type": "CheckpointHook", "interval": 300, "by_epoch": False}
    assert cfg.default_hooks.logger.log_metric_by_epoch is False and cfg.log_processor == {"by_epoch": False}
    with pytest.raises(ConfigError, match="max_iters must be >= 1"):
        compress_schedule(cfg, 0)
