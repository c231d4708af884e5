"""The ``densevision`` command. Thin: parse, call the library, print. Bad input or usage: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from densevision import __version__
from densevision.errors import DenseVisionError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; we keep the one-line convention.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _format_info(d: dict[str, Any]) -> str:
    lines = [
        f"path:       {d['path']}",
        f"backend:    {d['backend']} ({d['format']})",
        f"size:       {d['size'][0]} x {d['size'][1]} px (W x H)",
        f"levels:     {d['level_count']}",
    ]
    for i, lv in enumerate(d["levels"]):
        w, h = lv["dimensions"]
        lines.append(f"  level {i}:  {w} x {h} px, downsample {lv['downsample']:.6g}")
    if d["mpp"]:
        lines.append(f"mpp:        {d['mpp'][0]:.6g} x {d['mpp'][1]:.6g} um/px")
    elif d["backend"] != "rasterio":
        lines.append("mpp:        unknown")
    if d["backend"] == "rasterio":
        lines.append(f"crs:        {d['crs'] or 'none (pixel coordinates)'}")
        a, b, c, dd, e, f = d["transform"]
        lines.append(
            f"transform:  x = {c:.10g} + {a:.10g}*col + {b:.10g}*row; y = {f:.10g} + {dd:.10g}*col + {e:.10g}*row"
        )
        lines.append(f"nodata:     {d['nodata']}")
    names = f" ({', '.join(d['band_names'])})" if d["band_names"] else ""
    lines.append(f"bands:      {d['band_count']}{names}")
    lines.append(f"dtype:      {d['dtype']}")
    lines += [f"note:       {n}" for n in d["notes"]]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from densevision.io import open_image

    facts = []
    for path in args.paths:
        with open_image(path) as src:
            facts.append(src.describe())
    if args.json:
        print(json.dumps(facts if len(facts) > 1 else facts[0], indent=2))
    else:
        print("\n\n".join(_format_info(d) for d in facts))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from densevision.apis import segment_image

    summary = segment_image(
        args.input,
        args.config,
        args.checkpoint,
        out=args.out,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        blend=args.blend,
        level=args.level,
        mpp=args.mpp,
        bands=args.bands,
        value_range=tuple(args.value_range) if args.value_range else None,
        device=args.device,
        amp=args.amp,
        workers=args.workers,
        probability_output=args.probabilities,
        skip_empty=not args.keep_empty,
        cfg_options=args.cfg_options,
        trust_checkpoint=args.trust_checkpoint,
        resume=args.resume,
        progress=not args.quiet,
    )
    t = summary["tiles"]
    print(f"segmentation: {summary['output']}")
    if summary["probabilities"]:
        print(f"probabilities: {summary['probabilities']}")
    print(f"preview: {summary['preview']}")
    print(f"tiles: {t['done']} done, {t['skipped']} skipped as empty, of {t['total']}")
    print(f"summary: {summary['summary']}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from densevision.apis import detect_objects, segment_instances

    run = segment_instances if args.command == "instances" else detect_objects
    options: dict[str, Any] = {"sam_checkpoint": args.sam} if args.command == "instances" else {"masks": args.masks}
    summary = run(
        args.input,
        args.config,
        args.checkpoint,
        out=args.out,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        level=args.level,
        mpp=args.mpp,
        bands=args.bands,
        value_range=tuple(args.value_range) if args.value_range else None,
        device=args.device,
        amp=args.amp,
        workers=args.workers,
        score_threshold=args.score_threshold,
        merge=args.merge,
        match=args.match,
        match_threshold=args.match_threshold,
        class_agnostic=args.class_agnostic,
        overview=args.overview,
        skip_empty=not args.keep_empty,
        coco_out=args.coco,
        native_crs=args.native_crs,
        cfg_options=args.cfg_options,
        trust_checkpoint=args.trust_checkpoint,
        resume=args.resume,
        progress=not args.quiet,
        **options,
    )
    t, d = summary["tiles"], summary["detections"]
    print(f"objects: {summary['output']} ({d['objects']} objects from {d['raw']} tile detections)")
    if summary["coco"]:
        print(f"coco results: {summary['coco']}")
    print(f"preview: {summary['preview']}")
    print(f"tiles: {t['done']} done, {t['skipped']} skipped as empty, of {t['total']}")
    print(f"summary: {summary['summary']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from densevision.demo.run import report, run_demo

    summary = run_demo(
        args.data,
        args.out,
        size=args.size,
        cache_dir=args.cache_dir,
        retrain=args.retrain,
        sam_checkpoint=args.sam,
        device=args.device,
        progress=not args.quiet,
    )
    print("\n".join(report(summary)))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="mmsegmentation / mmdetection config file (.py)")
    p.add_argument("-w", "--checkpoint", help="model weights (.pth); without it the model keeps its initialisation")
    from densevision.apis.train import CfgOptions

    p.add_argument(
        "--cfg-options",
        nargs="+",
        action=CfgOptions,
        metavar="KEY=VALUE",
        help="override config entries, as in mmengine",
    )
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="unpickle arbitrary objects in the checkpoint (runs its code!)"
    )
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--amp", action="store_true", help="run the model in bfloat16 autocast (GPUs with bf16)")


def _add_tiling_args(p: argparse.ArgumentParser, tile: int = 512, overlap: int = 64, batch: int = 4) -> None:
    p.add_argument("--tile", type=int, default=tile, help=f"tile size in working pixels (default: {tile})")
    p.add_argument(
        "--overlap", type=int, default=overlap, help=f"pixels shared by neighbouring tiles (default: {overlap})"
    )
    p.add_argument("--batch-size", type=int, default=batch, help=f"tiles per model call (default: {batch})")
    p.add_argument("--workers", type=int, default=2, help="reader processes (default: 2)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--level", type=int, help="pyramid level to work at (default: 0, full resolution)")
    where.add_argument("--mpp", type=float, help="working resolution in microns per pixel (slides)")
    p.add_argument("--bands", type=int, nargs="+", help="raster bands to feed the model, 1-based, in order")
    p.add_argument(
        "--value-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="stretch LO..HI to 0..255 for non-8-bit rasters (default: per-band 2nd-98th percentiles)",
    )
    p.add_argument("--keep-empty", action="store_true", help="also run tiles with no tissue / only nodata")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="densevision", description=__doc__)
    parser.add_argument("--version", action="version", version=f"densevision {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="print size, levels, resolution / CRS, bands and dtype of images")
    info.add_argument("paths", nargs="+", metavar="PATH", help="slide, raster or image files")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    seg = sub.add_parser("segment", help="segment a whole slide or scene with an mmsegmentation model")
    seg.add_argument("input", metavar="INPUT", help="slide, raster or image")
    seg.add_argument("-o", "--out", required=True, help="output class map (.tif); summary and preview go beside it")
    _add_model_args(seg)
    _add_tiling_args(seg)
    seg.add_argument(
        "--blend",
        default="gaussian",
        choices=["crop", "gaussian", "hann", "constant"],
        help="how overlapping tiles are combined (default: gaussian)",
    )
    seg.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (*.probs.tif)")
    seg.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its OUT.partial.d work folder"
    )
    seg.set_defaults(func=cmd_segment)

    for name, text in (
        ("detect", "detect objects over a whole slide or scene with an mmdetection model"),
        ("instances", "instance masks over a whole slide or scene: detector boxes prompting SAM"),
    ):
        det = sub.add_parser(name, help=text)
        det.add_argument("input", metavar="INPUT", help="slide, raster or image")
        det.add_argument("-o", "--out", required=True, help="objects (.geojson); summary and preview go beside it")
        _add_model_args(det)
        if name == "instances":
            det.add_argument(
                "--sam", metavar="SAM_CHECKPOINT",
                help="official SAM checkpoint (vit_b / vit_l / vit_h); without it the detector's own masks are used",
            )  # fmt: skip
        else:
            det.add_argument(
                "--masks", action=argparse.BooleanOptionalAction, default=None,
                help="outline objects with the detector's masks (default: when it has a mask head)",
            )  # fmt: skip
        _add_tiling_args(det, tile=1024, overlap=128, batch=2)
        det.add_argument("--score-threshold", type=float, default=0.3, help="drop detections below (default: 0.3)")
        det.add_argument(
            "--merge", default="nmm", choices=["nms", "nmm", "greedy_nmm"],
            help="how detections of one object from overlapping tiles are merged (default: nmm)",
        )  # fmt: skip
        det.add_argument(
            "--match", default="ios", choices=["iou", "ios"],
            help="match by intersection over union, or over the smaller box (default: ios)",
        )  # fmt: skip
        det.add_argument("--match-threshold", type=float, default=0.5, help="match above this (default: 0.5)")
        det.add_argument("--class-agnostic", action="store_true", help="merge detections of different classes too")
        det.add_argument(
            "--overview", action="store_true",
            help="also detect on the whole image shrunk to one tile, for objects larger than the overlap",
        )  # fmt: skip
        det.add_argument("--coco", metavar="RESULTS_JSON", help="also write COCO results JSON (level-0 pixels)")
        det.add_argument(
            "--native-crs", action="store_true", help="rasters: keep the raster's CRS instead of WGS84 lon/lat"
        )
        det.add_argument(
            "--resume", action="store_true", help="continue an interrupted run from its OUT.partial.d work folder"
        )
        det.set_defaults(func=cmd_detect)

    from densevision.demo import SIZES

    demo = sub.add_parser("demo", help="the main job on generated big images from the sample data, scored")
    demo.add_argument("--data", help="sample data folder (default: ../shared/data beside the repository)")
    demo.add_argument("-o", "--out", help="output folder (default: outputs/demo in the repository)")
    demo.add_argument(
        "--size", default="small", choices=SIZES,
        help="small: 8192^2 slide and 4096^2 scene (default); full: 16384^2 and 8192^2; tiny: seconds, for tests",
    )  # fmt: skip
    demo.add_argument("--cache-dir", help="trained-model cache (default: ~/.cache/densevision/demo)")
    demo.add_argument("--retrain", action="store_true", help="train the models even when they are cached")
    demo.add_argument("--sam", metavar="SAM_CHECKPOINT", help="also segment the scene's objects with box-prompted SAM")
    demo.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda:N (default: auto)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    # The same flags and code as tools/train.py and tools/test.py, with -c / -w / -o as the other commands.
    from densevision.apis.train import add_test_arguments, add_train_arguments, run_test, run_train

    train = sub.add_parser("train", help="fine-tune an mmdet / mmseg config on COCO- or ADE20k-format data")
    add_train_arguments(train, flags=True).set_defaults(func=run_train)
    test = sub.add_parser("test", help="evaluate a checkpoint: COCO bbox / segm mAP, or ADE20k mIoU")
    add_test_arguments(test, flags=True).set_defaults(func=run_test)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DenseVisionError as e:
        print(f"densevision: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
