"""Seams with a real backbone: tiled (densevision) against whole-image (mmseg) argmax maps of a trained UperNet-Swin-T.

1. Data: ``make_ade_dataset`` (planted discs / squares / triangles on smooth textures, ADE20k layout), 256 px images.
2. Model: the project's ``configs/segmentation/upernet_swin-t_ade20k-512.py`` with its full Swin-T backbone (UperNet
   channels ``--head-channels``, default the config's 512), trained from scratch with ``densevision.apis.train.train``
   for ``--iters`` iterations (cached in the work dir: a second run with the same settings reuses the checkpoint).
   ``--iters 0`` measures near-random weights (one iteration).
3. Test image: validation scenes of the same generator mosaicked into one ``--mosaic`` grid (default 4 x 3 scenes,
   1024 x 768 px), saved as PNG, so tile borders fall through objects and between scenes.
4. Whole image: mmseg's ``inference_model`` with ``test_cfg.mode="whole"`` (the whole image as one tensor, at its
   own resolution: the config's test pipeline would first resize it to a 512-px short side).
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
import os
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
    p.add_argument(
        "--train-mosaic", action="store_true", help="training images are --mosaic scenes side by side, like the test"
    )
    p.add_argument("--crop", type=int, help="train on random crops of this side (default: whole images)")
    p.add_argument(
        "--label-edges", action="store_true", help="train with the ring around objects labelled, not ignored"
    )
    p.add_argument("--amp", action="store_true", help="bfloat16 mixed-precision training (GPU)")
    p.add_argument(
        "--train-seconds", type=float, help="fit the iterations to this many seconds of training\n"
        "(a --probe-iters probe times them); --iters is then ignored",
    )  # fmt: skip
    p.add_argument("--probe-iters", type=int, default=40, help="iterations of that probe (default 40; 11 at least)")
    p.add_argument(
        "--reference-only", action="store_true", help="compare mmseg's whole-image and slide inference only (no GDAL\n"
        "needed: the reference pair's agreement, kept in the run's reference.json)",
    )  # fmt: skip
    p.add_argument(
        "--half", action="store_true", help="compare (and keep) the trained weights rounded to float16:\n"
        "a checkpoint a quarter the size, to copy to another machine",
    )  # fmt: skip
    p.add_argument("--model", nargs=2, metavar=("CONFIG", "CHECKPOINT"), help="compare this model instead of training")
    p.add_argument("--device", default="cpu", help="device of both predictions (default cpu)")
    p.add_argument(
        "--processes",
        type=int,
        default=2,
        help="processes generating the training data, and data\nloader workers (at most 8) (default 2)",
    )
    p.add_argument("--mosaic", default="4x3", help="test image: columns x rows of 256-px scenes (default 4x3)")
    p.add_argument("--tile", type=int, default=256, help="tile side (default 256)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap (default 64)")
    p.add_argument("--blends", nargs="+", choices=BLENDS, default=list(BLENDS), help="blends to compare")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/densevision-bench/seams"), help="data, model, outputs")
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/README.md")
    return p.parse_args(argv)


def layout(mosaic: str) -> tuple[int, int]:
    """``"4x3"`` -> (4, 3) scenes across and down."""
    cols, _, rows = mosaic.partition("x")
    return int(cols), int(rows or cols)


def training_name(args: argparse.Namespace) -> str:
    """The work folder of a training run: every setting that changes the model."""
    name = f"upernet{args.head_channels}-swin-t_{args.iters}it_b{args.batch_size}_lr{args.lr:g}_n{args.train_images}"
    if args.train_seconds:
        name = name.replace(f"_{args.iters}it", f"_{args.train_seconds:g}s")
    if args.train_mosaic:
        name += f"_mosaic{args.mosaic}"
    if args.crop:
        name += f"_crop{args.crop}"
    return name + ("_edges" if args.label_edges else "") + ("_amp" if args.amp else "")


def lay_out(images: list[Path], labels: list[Path], nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """``nx x ny`` scenes (image and label files, row by row) side by side: the mosaic's pixels and labels."""
    pixels = np.zeros((ny * SCENE, nx * SCENE, 3), np.uint8)
    truth = np.zeros((ny * SCENE, nx * SCENE), np.uint8)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        y, x = (i // nx) * SCENE, (i % nx) * SCENE
        pixels[y : y + SCENE, x : x + SCENE] = np.asarray(Image.open(img).convert("RGB"))
        truth[y : y + SCENE, x : x + SCENE] = np.asarray(Image.open(lab))
    return pixels, truth


def _mosaics(job: tuple[Path, int, int, tuple[int, int], bool, int]) -> None:
    """One process's share of :func:`mosaic_dataset`: scenes generated with its seed, then laid out."""
    from densevision.synthetic.datasets import make_ade_dataset

    root, first, count, (nx, ny), ignore_edges, seed = job
    ds = make_ade_dataset(
        root / "scenes" / f"{first}", num_train=count * nx * ny, num_val=0, image_size=SCENE,
        ignore_edges=ignore_edges, seed=seed,
    )  # fmt: skip
    images = sorted((ds.root / "images" / "training").glob("*.jpg"))
    labels = sorted((ds.root / "annotations" / "training").glob("*.png"))
    n = nx * ny
    for m in range(count):
        pixels, truth = lay_out(images[m * n : (m + 1) * n], labels[m * n : (m + 1) * n], nx, ny)
        stem = f"ADE_train_{first + m + 1:08d}"
        Image.fromarray(pixels).save(root / "images" / "training" / f"{stem}.png", compress_level=1)
        Image.fromarray(truth).save(root / "annotations" / "training" / f"{stem}.png")


def mosaic_dataset(root: Path, count: int, mosaic: tuple[int, int], ignore_edges: bool, processes: int) -> Path:
    """An ADE-layout training set of ``count`` PNG mosaics built as the test image is (other seeds)."""
    import multiprocessing
    import shutil

    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for folder in ("images", "annotations"):
        (root / folder / "training").mkdir(parents=True)
    shares = np.array_split(np.arange(count), max(1, processes))
    jobs = [(root, int(ids[0]), len(ids), mosaic, ignore_edges, 1000 + k) for k, ids in enumerate(shares) if len(ids)]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        pool.map(_mosaics, jobs)
    info = next((root / "scenes" / "0").glob("objectInfo*.txt"))
    shutil.copy(info, root / info.name)  # the class names; the pixel ratios are one share's
    shutil.rmtree(root / "scenes")
    (root / "done").touch()
    return root


def train_model(args: argparse.Namespace) -> dict[str, Any]:
    """The trained (with ``--iters 0``: one iteration) model's record: ``config``, ``checkpoint`` (with ``--half``
    the float16 one), ``losses``, ``iterations``, and ``seconds`` and ``device`` of the training where recorded."""
    work = args.workdir / training_name(args)
    done = work / "result.json"
    if not done.is_file():
        done.write_text(json.dumps(_train(args, training_data(args), work)))  # data only when training
    r = json.loads(done.read_text())
    if args.half and not r.get("half"):
        r["half"] = str(work / "model_half.pth")
        save_half(r["checkpoint"], Path(r["half"]))
        done.write_text(json.dumps(r))
    return r | {"checkpoint": r["half"] if args.half else r["checkpoint"]}


def _train(args: argparse.Namespace, data_root: Path, work: Path) -> dict[str, Any]:
    import torch

    from densevision.apis.train import train

    started = time.perf_counter()
    options: dict[str, Any] = {
        # padded to multiples of 32 (Swin's patches x merges) rather than to one size: no image is padded
        "model.data_preprocessor.size": None,
        "model.data_preprocessor.size_divisor": 32,
        "model.backbone.drop_path_rate": 0.0,
        "model.decode_head.channels": args.head_channels,
        "model.auxiliary_head.channels": args.head_channels // 2,
        "model.test_cfg": {"mode": "whole"},
        "train_dataloader.dataset.pipeline": [
            {"type": "LoadImageFromFile"},
            {"type": "LoadAnnotations", "reduce_zero_label": True},
            *([{"type": "RandomCrop", "crop_size": (args.crop, args.crop)}] if args.crop else []),
            {"type": "RandomFlip", "prob": 0.5},
            {"type": "PackSegInputs"},
        ],
        "optim_wrapper.optimizer.lr": args.lr,
        "val_cfg": None,
        "val_dataloader": None,
        "val_evaluator": None,
    }
    if args.train_mosaic:
        options["train_dataloader.dataset.img_suffix"] = ".png"
    if args.amp:
        options["optim_wrapper.dtype"] = "bfloat16"  # no overflow in Swin's attention, unlike float16
    run = dict(
        data_root=data_root, cfg_options=options, batch_size=args.batch_size, num_workers=min(args.processes, 8),
        seed=0, amp=args.amp,
    )  # fmt: skip
    iters = max(args.iters, 1)
    if args.train_seconds:
        probe = train(CONFIG, work_dir=work / "probe", max_iters=args.probe_iters, log_interval=10, **run)
        per_iter = float(np.median(probe["iteration_seconds"][10:]))  # after the first ten: warm
        iters = max(1, int(args.train_seconds / per_iter))
        print(f"probe: {per_iter:.3f} s per iteration -> {iters} iterations in {args.train_seconds:g} s", flush=True)
    interval = max(100, iters // 5)  # checkpoints on the way: a run cut short still leaves a model
    r = train(CONFIG, work_dir=work, max_iters=iters, log_interval=25, checkpoint_interval=interval, **run)
    # --iters 0 keeps the one iteration's checkpoint: both sides must load the same (near random) weights
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    return {"config": r["config"], "checkpoint": r["checkpoint"], "losses": r["losses"], "iterations": iters,
            "seconds": time.perf_counter() - started, "device": device}  # fmt: skip


def save_half(checkpoint: str, path: Path) -> None:
    """The checkpoint's weights as float16 and its meta (classes, palette), without the optimizer: a quarter of the
    bytes. Loading it into the float32 model gives that model exactly these (rounded) weights."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": ckpt.get("meta", {}), "state_dict": state}, path)


def test_image(args: argparse.Namespace) -> tuple[Path, np.ndarray, int]:
    """Validation scenes mosaicked into one PNG; returns it, the truth labels (0 = ignore) and the class count."""
    from densevision.synthetic.datasets import make_ade_dataset

    nx, ny = layout(args.mosaic)
    ds = make_ade_dataset(args.workdir / "test-scenes", num_train=0, num_val=nx * ny, image_size=SCENE, seed=99)
    imgs = sorted((ds.root / "images" / "validation").glob("*.jpg"))
    labels = sorted((ds.root / "annotations" / "validation").glob("*.png"))
    pixels, truth = lay_out(imgs, labels, nx, ny)
    path = args.workdir / f"mosaic_{nx}x{ny}.png"
    Image.fromarray(pixels).save(path)
    return path, truth, len(ds.classes)


def mmseg_prediction(
    config: str, checkpoint: str | None, image: Path, device: str, tile: int | None = None, stride: int | None = None
) -> tuple[np.ndarray, float]:
    """mmseg's own whole-image prediction (class indices) and its time; with ``tile``: its slide inference."""
    from mmseg.apis import inference_model, init_model

    from densevision.compat import patch_mmengine

    patch_mmengine()
    test_cfg = {"mode": "slide", "crop_size": (tile, tile), "stride": (stride, stride)} if tile else {"mode": "whole"}
    # the image at its own resolution, as densevision reads it: the config's test pipeline would first resize it
    # (ADE's Resize to a 512-px short side)
    pipeline = [{"type": "LoadImageFromFile"}, {"type": "PackSegInputs"}]
    options = {"model.test_cfg": test_cfg, "test_pipeline": pipeline}
    model = init_model(config, checkpoint, device=device, cfg_options=options)
    start = time.perf_counter()
    result = inference_model(model, str(image))
    return result.pred_sem_seg.data[0].cpu().numpy().astype(np.uint8), time.perf_counter() - start


def tiled(args: argparse.Namespace, config: str, checkpoint: str | None, image: Path, blend: str) -> tuple[Any, float]:
    import tifffile

    from densevision.apis.segment import segment_image

    out = args.workdir / f"tiled_{image.stem}_{blend}.tif"
    start = time.perf_counter()
    segment_image(
        image, config, checkpoint, out=out, tile=args.tile, overlap=args.overlap, blend=blend, skip_empty=False,
        workers=0, device=args.device, progress=False,
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


def trained(args: argparse.Namespace, iters: int | None) -> str:
    if args.model:
        return "given model"
    return f"trained {iters} iterations" if args.iters or args.train_seconds else "near-random weights (1 iteration)"


def describe_model(args: argparse.Namespace, record: dict[str, Any]) -> str:
    """One sentence: the model and how it was trained."""
    if args.model:
        return f"Model: `{record['config']}` with `{record['checkpoint']}` (given)."
    losses, seconds, device = record["losses"], record.get("seconds"), record.get("device")
    took = f"{seconds:.0f} s" if seconds is not None else "trained in an earlier run"
    took += f" on {device}" if device else ""
    loss = f"; loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}" if len(losses) > 1 else ""
    data = (
        f"{args.train_images} generated {args.mosaic} mosaics" if args.train_mosaic
        else f"{args.train_images} generated 256-px images"
    )  # fmt: skip
    crops = f", random {args.crop}-px crops" if args.crop else ""
    edges = ", object edges labelled" if args.label_edges else ""
    return (
        f"Model: UperNet ({args.head_channels} channels) + Swin-T (full size; {CONFIG.relative_to(REPO)}), "
        f"{trained(args, record.get('iterations'))} (batch {args.batch_size}, AdamW lr {args.lr:g}"
        f"{', bfloat16 AMP' if args.amp else ''}, "
        f"{data}{crops}{edges}, {took}{loss}){'; weights rounded to float16' if args.half else ''}."
    )


def training_data(args: argparse.Namespace) -> Path:
    """The generated training set's root: 256-px scenes, or with ``--train-mosaic`` mosaics like the test image."""
    from densevision.synthetic.datasets import make_ade_dataset

    edges = "_edges" if args.label_edges else ""
    if args.train_mosaic:
        root = args.workdir / f"train-mosaics{args.mosaic}{edges}_n{args.train_images}"
        return mosaic_dataset(root, args.train_images, layout(args.mosaic), not args.label_edges, args.processes)
    return make_ade_dataset(
        args.workdir / f"train-data{edges}", num_train=args.train_images, num_val=0, image_size=SCENE,
        ignore_edges=not args.label_edges,
    ).root  # fmt: skip


def reference_only(
    args: argparse.Namespace, config: str, checkpoint: str | None, image: Path, whole: np.ndarray, truth: np.ndarray,
    k: int, iters: int | None,
) -> Part:  # fmt: skip
    """mmseg's slide inference (densevision's constant blend on the same grid) against its whole-image map."""
    slide, _ = mmseg_prediction(config, checkpoint, image, args.device, args.tile, args.tile - args.overlap)
    result = {
        "agreement": float(np.mean(slide == whole)), "miou_whole": miou(whole, truth, k),
        "miou_slide": miou(slide, truth, k), "iterations": iters,
    }  # fmt: skip
    if checkpoint:
        (Path(checkpoint).parent / "reference.json").write_text(json.dumps(result))
    headline = (
        f"Seams, mmseg only ({trained(args, iters)}): slide inference (tile {args.tile}, overlap {args.overlap}) "
        f"agrees with whole-image inference on {100 * result['agreement']:.3f} % of pixels; mIoU whole "
        f"{result['miou_whole']:.3f}, slide {result['miou_slide']:.3f}."
    )
    return Part(headline + "\n", [headline])


def measure(args: argparse.Namespace) -> Part:
    """Train (or reuse) the model, predict the mosaic whole and tiled per blend; the table and its headline."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    record = {"config": args.model[0], "checkpoint": args.model[1], "losses": []} if args.model else train_model(args)
    config, checkpoint, iters = record["config"], record["checkpoint"], record.get("iterations")
    image, truth, k = test_image(args)
    whole, whole_s = mmseg_prediction(config, checkpoint, image, args.device)
    if args.reference_only:
        return reference_only(args, config, checkpoint, image, whole, truth, k, iters)
    shared = in_overlaps(truth.shape, args.tile, args.overlap)
    edges = near_edges(whole)
    rows = [
        f"| whole image (mmseg `inference_model`, mode whole, at the image's resolution) | - | - | - | {whole_s:.1f} | "
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
    text = "\n".join(
        [
            f"{describe_model(args, record)} Image: {w} x {h} px mosaic of "
            f"{args.mosaic} generated scenes; tile {args.tile}, overlap {args.overlap}; device {args.device}.",
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
        f"Seams (UperNet + full Swin-T, {trained(args, iters)}, {w} x {h} mosaic, tile {args.tile}): tiled "
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
