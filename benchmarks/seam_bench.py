"""Seams with a real backbone: tiled (densevision) against whole-image (mmseg) argmax maps of a trained UperNet-Swin-T.

1. Data: ``make_ade_dataset`` (planted discs / squares / triangles on smooth textures, ADE20k layout), 256 px images.
2. Model: the project's ``configs/segmentation/upernet_swin-t_ade20k-512.py`` with its full Swin-T backbone (UperNet
   channels ``--head-channels``, default the config's 512), trained from scratch with ``densevision.apis.train.train``
   for ``--iters`` iterations (cached in the work dir: a second run with the same settings reuses the checkpoint).
   ``--iters 0`` measures near-random weights (one iteration).
3. Test image: validation scenes of the same generator mosaicked into one ``--mosaic`` grid (default 4 x 3 scenes,
   1024 x 768 px), saved as PNG, so tile borders fall through objects and between scenes.
4. Whole image: mmseg's ``inference_model`` with ``test_cfg.mode="whole"`` (the whole image as one tensor).
   Tiled: ``densevision.segment_image`` with ``--tile`` / ``--overlap`` (default 256 / 64) and each blend.
   Reported per blend: the share of pixels whose class agrees with the whole-image map, and each map's mIoU against
   the planted truth.

UperNet's pyramid pooling (its scale-1 branch is the global average of the input) and Swin's shifted windows make
whole-image and tile predictions differ by construction; a trained model's confident logits keep the argmax equal.

    python benchmarks/seam_bench.py                  # train 300 iterations (cached), then compare
    python benchmarks/seam_bench.py --iters 0        # near-random weights, for contrast
    python benchmarks/seam_bench.py --append         # record the table in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import Part, host
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
CONFIG = REPO / "configs" / "segmentation" / "upernet_swin-t_ade20k-512.py"
BLENDS = ("gaussian", "hann", "constant", "crop")
SCENE = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=300, help="training iterations (0: one, near random; default 300)")
    p.add_argument("--batch-size", type=int, default=4, help="training batch (default 4)")
    p.add_argument(
        "--head-channels", type=int, default=512, help="UperNet channels (default 512, the config's; aux head: half)"
    )
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--train-images", type=int, default=64, help="generated training images (default 64)")
    p.add_argument("--mosaic", default="4x3", help="test image: columns x rows of 256-px scenes (default 4x3)")
    p.add_argument("--tile", type=int, default=256, help="tile side (default 256)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap (default 64)")
    p.add_argument("--blends", nargs="+", choices=BLENDS, default=list(BLENDS), help="blends to compare")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench/seams"), help="data, model, outputs")
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/README.md")
    return p.parse_args(argv)


def train_model(args: argparse.Namespace, data_root: Path) -> tuple[str, str | None, list[float], float | None]:
    """The trained (with ``--iters 0``: one iteration) config and checkpoint, the losses and the training
    seconds (None for a model reused from an earlier run that did not record them)."""
    from densevision.apis.train import train

    name = f"upernet{args.head_channels}-swin-t_{args.iters}it_b{args.batch_size}_lr{args.lr:g}_n{args.train_images}"
    work = args.workdir / name
    done = work / "result.json"
    if done.is_file():
        r = json.loads(done.read_text())
        return r["config"], r["checkpoint"], r["losses"], r.get("seconds")
    started = time.perf_counter()
    size = (SCENE, SCENE)
    options: dict[str, Any] = {
        "model.data_preprocessor.size": size,
        "model.backbone.drop_path_rate": 0.0,
        "model.decode_head.channels": args.head_channels,
        "model.auxiliary_head.channels": args.head_channels // 2,
        "model.test_cfg": {"mode": "whole"},
        "train_dataloader.dataset.pipeline": [
            {"type": "LoadImageFromFile"},
            {"type": "LoadAnnotations", "reduce_zero_label": True},
            {"type": "RandomFlip", "prob": 0.5},
            {"type": "PackSegInputs"},
        ],
        "optim_wrapper.optimizer.lr": args.lr,
        "val_cfg": None,
        "val_dataloader": None,
        "val_evaluator": None,
    }
    r = train(
        CONFIG,
        work_dir=work,
        data_root=data_root,
        cfg_options=options,
        max_iters=max(args.iters, 1),
        batch_size=args.batch_size,
        num_workers=0,
        seed=0,
        log_interval=25,
    )
    seconds = time.perf_counter() - started
    # --iters 0 keeps the one iteration's checkpoint: both sides must load the same (near random) weights
    result = {"config": r["config"], "checkpoint": r["checkpoint"], "losses": r["losses"]}
    done.write_text(json.dumps(result | {"seconds": seconds}))
    return result["config"], result["checkpoint"], result["losses"], seconds


def test_image(args: argparse.Namespace) -> tuple[Path, np.ndarray, int]:
    """Validation scenes mosaicked into one PNG; returns it, the truth labels (0 = ignore) and the class count."""
    from densevision.datasets import make_ade_dataset

    cols, _, rows = args.mosaic.partition("x")
    nx, ny = int(cols), int(rows or cols)
    ds = make_ade_dataset(args.workdir / "test-scenes", num_train=0, num_val=nx * ny, image_size=SCENE, seed=99)
    imgs = sorted((ds.root / "images" / "validation").glob("*.jpg"))
    labels = sorted((ds.root / "annotations" / "validation").glob("*.png"))
    pixels = np.zeros((ny * SCENE, nx * SCENE, 3), np.uint8)
    truth = np.zeros((ny * SCENE, nx * SCENE), np.uint8)
    for i, (img, lab) in enumerate(zip(imgs, labels, strict=True)):
        y, x = (i // nx) * SCENE, (i % nx) * SCENE
        pixels[y : y + SCENE, x : x + SCENE] = np.asarray(Image.open(img).convert("RGB"))
        truth[y : y + SCENE, x : x + SCENE] = np.asarray(Image.open(lab))
    path = args.workdir / f"mosaic_{nx}x{ny}.png"
    Image.fromarray(pixels).save(path)
    return path, truth, len(ds.classes)


def whole_image(config: str, checkpoint: str | None, image: Path) -> tuple[np.ndarray, float]:
    """mmseg's own whole-image prediction (class indices) and its time."""
    from mmseg.apis import inference_model, init_model

    from densevision.compat import patch_mmengine

    patch_mmengine()
    model = init_model(config, checkpoint, device="cpu", cfg_options={"model.test_cfg": {"mode": "whole"}})
    start = time.perf_counter()
    result = inference_model(model, str(image))
    return result.pred_sem_seg.data[0].numpy().astype(np.uint8), time.perf_counter() - start


def tiled(args: argparse.Namespace, config: str, checkpoint: str | None, image: Path, blend: str) -> tuple[Any, float]:
    import tifffile

    from densevision.apis.segment import segment_image

    out = args.workdir / f"tiled_{image.stem}_{blend}.tif"
    start = time.perf_counter()
    segment_image(
        image, config, checkpoint, out=out, tile=args.tile, overlap=args.overlap, blend=blend, skip_empty=False,
        workers=0, device="cpu", progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    with tifffile.TiffFile(out) as tif:
        return tif.pages[0].asarray(), seconds


def miou(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean IoU over the classes present in the truth (labels 1..k; 0 ignored), pred in 0..k-1 (reduce-zero-label)."""
    valid = truth > 0
    t, p = truth[valid].astype(int) - 1, pred[valid].astype(int)
    ious = []
    for c in range(k):
        inter, union = np.sum((t == c) & (p == c)), np.sum((t == c) | (p == c))
        if np.any(t == c):
            ious.append(inter / union)
    return float(np.mean(ious))


def in_overlaps(shape: tuple[int, int], tile: int, overlap: int) -> np.ndarray:
    """Pixels that two or more tiles of the grid cover (where blending happens; elsewhere one tile decides)."""
    from densevision.tiling import TileGrid

    h, w = shape
    grid = TileGrid(w, h, tile, overlap)
    covered = np.zeros((h, w), np.uint8)
    for t in grid:
        covered[t.y : t.y + t.height, t.x : t.x + t.width] += 1
    return covered > 1


def near_edges(labels: np.ndarray, distance: int = 2) -> np.ndarray:
    """Pixels within ``distance`` of a class boundary of ``labels`` (where a 1-pixel shift of an edge shows)."""
    from scipy import ndimage

    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return ndimage.binary_dilation(edge, iterations=distance)


def measure(args: argparse.Namespace) -> Part:
    """Train (or reuse) the model, predict the mosaic whole and tiled per blend; the table and its headline."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    from densevision.datasets import make_ade_dataset

    data = make_ade_dataset(args.workdir / "train-data", num_train=args.train_images, num_val=0, image_size=SCENE)
    config, checkpoint, losses, train_s = train_model(args, data.root)
    image, truth, k = test_image(args)
    whole, whole_s = whole_image(config, checkpoint, image)
    shared = in_overlaps(truth.shape, args.tile, args.overlap)
    edges = near_edges(whole)
    rows = [
        f"| whole image (mmseg `inference_model`, mode whole) | - | - | - | {whole_s:.1f} | "
        f"{miou(whole, truth, k):.3f} |"
    ]
    agreement, preds = {}, {}
    for blend in args.blends:
        pred, seconds = tiled(args, config, checkpoint, image, blend)
        preds[blend] = pred
        agree = agreement[blend] = float(np.mean(pred == whole))
        differ = pred != whole
        print(f"{blend}: {agree:.5f} of pixels agree", flush=True)
        rows.append(f"| densevision `segment_image`, blend {blend} | {100 * agree:.3f} % | "
                    f"{100 * differ[shared].mean():.3f} / {100 * differ[~shared].mean():.3f} % | "
                    f"{100 * (differ & edges).sum() / max(differ.sum(), 1):.0f} % | {seconds:.1f} | "
                    f"{miou(pred, truth, k):.3f} |")  # fmt: skip
    h, w = truth.shape
    moved = ""
    if "gaussian" in args.blends:  # move every seam by half a stride relative to the content
        shift = (args.tile - args.overlap) // 2
        shifted = args.workdir / f"{image.stem}_shift{shift}.png"
        Image.open(image).crop((shift, shift, w, h)).save(shifted)
        pred_moved, _ = tiled(args, config, checkpoint, shifted, "gaussian")
        same = float(np.mean(pred_moved == preds["gaussian"][shift:, shift:]))
        moved = (
            f" Moving the seams: the gaussian run on the mosaic cropped by {shift} px at the top and left (every tile "
            f"border moves {shift} px across the content) agrees with the unmoved run on {100 * same:.3f} % of their "
            f"common pixels, and with the whole-image map on "
            f"{100 * float(np.mean(pred_moved == whole[shift:, shift:])):.3f} %."
        )
    took = f"{train_s:.0f} s" if train_s is not None else "trained in an earlier run"
    trained = f"trained {args.iters} iterations" if args.iters else "near-random weights (one training iteration)"
    loss = f"; loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}" if args.iters else ""
    text = "\n".join(
        [
            f"Model: UperNet ({args.head_channels} channels) + Swin-T (full size; "
            f"{CONFIG.relative_to(REPO)}), {trained} "
            f"(batch {args.batch_size}, AdamW lr {args.lr:g}, {args.train_images} generated 256-px images, "
            f"{took}{loss}). Image: {w} x {h} px mosaic of {args.mosaic} generated scenes; tile "
            f"{args.tile}, overlap {args.overlap}.",
            "",
            "| prediction | pixels agreeing with the whole-image argmax | differing where tiles overlap / "
            "elsewhere | of the differing, within 2 px of a class edge | seconds | mIoU vs planted truth |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"'Where tiles overlap': the {100 * shared.mean():.1f} % of pixels that two or more tiles cover (the "
            "blend decides there); elsewhere one tile alone decides. Differences that are as frequent elsewhere as "
            "in the overlaps come from what a tile cannot see (UperNet's global pooling, Swin's windows), not from "
            f"stitching. Class edges: {100 * edges.mean():.1f} % of the pixels lie within 2 px of an edge of the "
            f"whole-image map.{moved}",
            "",
        ]
    )
    best = "gaussian" if "gaussian" in agreement else next(iter(agreement))
    headline = (
        f"Seams (UperNet + full Swin-T, {trained}, {w} x {h} mosaic, tile {args.tile}): tiled "
        f"{best} argmax agrees with whole-image inference on {100 * agreement[best]:.2f} % of pixels (goal >= 99.9 %)."
    )
    return Part(text, [headline])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = f"PYTHONPATH=. .venv/bin/python benchmarks/seam_bench.py {shlex.join(argv or sys.argv[1:])}"
    part = measure(args)
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    text = f"### {when}\n\n`{command}`\n\nMachine: {host()}.\n\n{part.text}"
    print(text)
    if args.append:
        with README.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
