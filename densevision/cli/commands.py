"""The ``densevision`` command. Thin: parse, call the library, print. Bad input or usage: one line, exit 2.

The settings' defaults and choices come from the library (:mod:`densevision.apis.settings`); the libraries' logs go
to a log file beside the outputs (:mod:`densevision.cli.logs`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from densevision import __version__
from densevision.cli.logs import LogFile, default_log_dir, library_output, say
from densevision.errors import ConfigError, DenseVisionError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
INPUT_HELP = (
    "slide, raster or image; several, a folder (see --pattern) or a manifest (.csv with a path column and optional "
    "name, mpp, level, bands columns; .txt with a path a line) make a cohort"
)
VERBOSE = "show the libraries' logs and warnings on the terminal too (they always go to the log file)"

DESCRIPTION = """\
Dense prediction over gigapixel whole-slide images and large GeoTIFFs: a segmentation or detection model (an
mmsegmentation / mmdetection config, a shipped one by name or your own file) runs tile by tile and the predictions
are stitched into one whole-image result in the image's coordinates (slide pixels and microns, or the CRS). Outputs
open in QuPath and QGIS; a run summary and a preview go beside them, the libraries' logs into OUT's .log file.
"""

EXAMPLES = """\
examples:
  densevision info slide.svs scene.tif
  densevision segment slide.svs -c upernet_swin-t_ade20k-512 -w tissue.pth -o out/slide.tif --mpp 1.0
  densevision detect scene.tif -c dino_swin-t_fpn_coco -w ships.pth -o out/ships.geojson --tile 800 --overlap 160
  densevision segment slides/ -c upernet_swin-t_ade20k-512 -w tissue.pth -o out/ --pattern '*.svs' --mpp 1.0
  densevision instances slide.svs -c dino_swin-t_fpn_coco -w nuclei.pth --sam sam_vit_b_01ec64.pth -o out/n.geojson
  densevision train -c upernet_swin-t_ade20k-512 --data-root data/my_ade --work-dir work/seg
  densevision test -c work/seg/upernet_swin-t_ade20k-512.py -w work/seg/iter_160000.pth --data-root data/my_ade
  densevision demo                      # the main job on generated images from the shipped samples, scored
  torchrun --nproc_per_node 2 -m densevision.cli segment slide.svs -c ... -o out/slide.tif   # several processes
  torchrun --nproc_per_node 4 -m densevision.cli segment cohort.csv -c ... -o out/   # ranks claim the images

Bad input prints one line starting with 'densevision: error:' and exits 2; -v shows the libraries' logs.
"""


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
        say(json.dumps(facts if len(facts) > 1 else facts[0], indent=2))
    else:
        say("\n\n".join(_format_info(d) for d in facts))
    return 0


def _job_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings groups shared by segment / detect / instances, from their flags."""
    from densevision.apis.settings import Compute, Model, Reading, Tiling

    return {
        "model": Model(args.config, args.checkpoint, args.cfg_options, args.trust_checkpoint),
        "tiling": Tiling(args.tile, args.overlap, args.batch_size),
        "reading": Reading(
            level=args.level,
            mpp=args.mpp,
            bands=tuple(args.bands) if args.bands else None,
            value_range=tuple(args.value_range) if args.value_range else None,
            skip_empty=not args.keep_empty,
            workers=args.workers,
        ),
        "compute": Compute(args.device, args.amp, progress=not args.quiet, compile=args.compile),
        "resume": args.resume,
    }


def _report_job(summary: dict[str, Any], lines: list[str]) -> int:
    if "rank" in summary:  # another rank of a torchrun: rank 0 reports
        return 0
    t = summary["tiles"]
    for line in [*lines, f"preview: {summary['preview']}"]:
        say(line)
    say(f"tiles: {t['done']} done, {t['skipped']} skipped as empty, of {t['total']}")
    say(f"summary: {summary['summary']}")
    return 0


def is_cohort(args: argparse.Namespace) -> bool:
    """Several inputs, a folder, a manifest, or an output that is a folder: a cohort into the folder ``-o``."""
    from densevision.apis.cohort import MANIFEST_SUFFIXES

    first, out = Path(args.inputs[0]), Path(args.out)
    return (
        len(args.inputs) > 1 or first.is_dir() or first.suffix.lower() in MANIFEST_SUFFIXES
        or out.is_dir() or args.out.endswith(("/", os.sep)) or not out.suffix
    )  # fmt: skip


def above_bars(line: str) -> None:
    """A line on the terminal (standard error, where the progress bars are) above the bars, which are redrawn."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _run_cohort(args: argparse.Namespace, **task_settings: Any) -> int:
    from densevision.apis.cohort import SUFFIXES, run_cohort

    if Path(args.out).suffix.lower() == SUFFIXES[args.command]:
        raise ConfigError(f"-o {args.out}: several images go into a folder; give -o a folder (e.g. -o results/)")
    settings = _job_settings(args)
    settings.pop("resume")  # a cohort always continues what it finds
    result = run_cohort(
        args.inputs, args.out, args.command, pattern=args.pattern, overwrite=args.overwrite, fail_fast=args.fail_fast,
        shard=args.shard, split_above=int(args.split_above * 1e6), log=above_bars, **settings, **task_settings,
    )  # fmt: skip
    if "rank" in result:
        return 0
    n = result["counts"]
    ran = n["done"] - result["already_done"]
    say(
        f"cohort: {n['done']} of {result['images']} done ({ran} now, {result['already_done']} before), "
        f"{n['failed']} failed, {n['changed']} with other settings, {n['running'] + n['pending']} left "
        f"in {result['seconds_wall']:.1f} s"
    )
    for row in result["rows"]:
        if row["status"] in ("failed", "changed"):
            say(f"  {row['status']} {row['name']}: {row['error']}")
    say(f"report: {result['report']['csv']}")
    return EXIT_INTERNAL if n["failed"] or n["changed"] else 0


def cmd_segment(args: argparse.Namespace) -> int:
    from densevision.apis.job import polygons_beside
    from densevision.apis.segment import segment_image
    from densevision.apis.settings import Segmentation

    polygons = args.polygons
    if polygons is not None and not is_cohort(args) and not Path(polygons).suffix:  # a format: beside the class map
        polygons = polygons_beside(Path(args.out), polygons)
    segmentation = Segmentation(
        args.blend, args.probabilities, args.probability_dtype, polygons=polygons,
        exclude_classes=tuple(args.exclude_classes) if args.exclude_classes is not None else None,
        min_area=args.min_area, simplify=args.simplify, connectivity=args.connectivity, native_crs=args.native_crs,
    )  # fmt: skip
    if is_cohort(args):
        return _run_cohort(args, segmentation=segmentation)
    summary = segment_image(args.inputs[0], out=args.out, segmentation=segmentation, **_job_settings(args))
    lines = [f"segmentation: {summary.get('output')}"]
    if summary.get("probabilities"):
        lines.append(f"probabilities: {summary['probabilities']}")
    if summary.get("polygons"):
        lines.append(f"polygons: {summary['polygons']} ({summary['regions']['regions']} regions)")
    return _report_job(summary, lines)


def cmd_detect(args: argparse.Namespace) -> int:
    from densevision.apis.detect import detect_objects
    from densevision.apis.job import beside
    from densevision.apis.settings import Detection

    instances = args.command == "instances"
    cohort = is_cohort(args)
    if cohort and args.coco:
        raise ConfigError(f"--coco {args.coco}: names one file; in a cohort give --coco alone (one beside each image)")
    coco = args.coco
    if coco == "":  # --coco alone: beside the objects (in a cohort: beside each image's)
        coco = "" if cohort else beside(Path(args.out), ".coco.json")
    detection = Detection(
        score_threshold=args.score_threshold, merge=args.merge, match=args.match,
        match_threshold=args.match_threshold, class_agnostic=args.class_agnostic, overview=args.overview,
        masks=True if instances else args.masks, sam_checkpoint=args.sam if instances else None,
        coco_out=coco, native_crs=args.native_crs,
    )  # fmt: skip
    if cohort:
        return _run_cohort(args, detection=detection)
    summary = detect_objects(args.inputs[0], out=args.out, detection=detection, **_job_settings(args))
    lines = []
    if "detections" in summary:
        d = summary["detections"]
        lines.append(f"objects: {summary['output']} ({d['objects']} objects from {d['raw']} tile detections)")
        if summary["coco"]:
            lines.append(f"coco results: {summary['coco']}")
    return _report_job(summary, lines)


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
        log=say,
    )
    say("\n".join(report(summary)))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from densevision.apis.settings import Compute
    from densevision.cli.train import CfgOptions

    p.add_argument(
        "-c", "--config", required=True,
        help="mmsegmentation / mmdetection config: a file (.py) or a shipped config's name (e.g. dino_swin-t_fpn_coco)",
    )  # fmt: skip
    p.add_argument("-w", "--checkpoint", help="model weights (.pth); without it the model keeps its initialisation")
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
    p.add_argument(
        "--device",
        default=Compute.device,
        help=f"auto (GPU if present), cpu, cuda, cuda:1 ... (default: {Compute.device})",
    )
    p.add_argument("--amp", action="store_true", help="run the model in bfloat16 autocast (GPUs with bf16)")
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the model (minutes to start, then faster on GPUs; outputs may differ in the last bits)",
    )  # fmt: skip


def _add_tiling_args(p: argparse.ArgumentParser, defaults: Any) -> None:
    from densevision.apis.settings import Reading

    p.add_argument(
        "--tile", type=int, default=defaults.tile, help=f"tile size in working pixels (default: {defaults.tile})"
    )
    p.add_argument(
        "--overlap", type=int, default=defaults.overlap,
        help=f"pixels shared by neighbouring tiles (default: {defaults.overlap})",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=defaults.batch_size,
        help=f"tiles per model call (default: {defaults.batch_size})",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=Reading.workers, help=f"reader processes (default: {Reading.workers})"
    )
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
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its OUT.partial.d work folder"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cohort = p.add_argument_group("cohorts (several inputs, a folder or a manifest; -o is then a folder)")
    cohort.add_argument(
        "--pattern", help="what to take from input folders, searched recursively (default: every image suffix)"
    )
    cohort.add_argument(
        "--overwrite", action="store_true",
        help="redo images whose outputs came from other settings (by default they are reported and left alone)",
    )  # fmt: skip
    cohort.add_argument("--fail-fast", action="store_true", help="stop at the first image that fails")
    cohort.add_argument(
        "--shard", metavar="I/N", help="take only every N-th image, starting at the I-th (1-based; job arrays)"
    )
    cohort.add_argument(
        "--split-above", type=float, default=1024, metavar="MEGAPIXELS",
        help="under torchrun, split images larger than this (working pixels) across the ranks (default: 1024)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from densevision.apis.settings import (
        BLEND_MODES,
        DETECTION_TILING,
        MATCH_CRITERIA,
        MERGE_METHODS,
        PROBABILITY_DTYPES,
        SEGMENTATION_TILING,
        Detection,
        Segmentation,
    )

    parser = _Parser(
        prog="densevision",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"densevision {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="print size, levels, resolution / CRS, bands and dtype of images")
    info.add_argument("paths", nargs="+", metavar="PATH", help="slide, raster or image files")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    seg = sub.add_parser("segment", help="segment a whole slide or scene with an mmsegmentation model")
    seg.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    seg.add_argument(
        "-o", "--out", required=True,
        help="output class map (.tif), summary and preview beside it; for a cohort, the folder they all go into",
    )  # fmt: skip
    _add_model_args(seg)
    _add_tiling_args(seg, SEGMENTATION_TILING)
    seg.add_argument(
        "--blend", default=Segmentation.blend, choices=BLEND_MODES,
        help=f"how overlapping tiles are combined (default: {Segmentation.blend})",
    )  # fmt: skip
    seg.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (*.probs.tif)")
    seg.add_argument(
        "--probability-dtype", default=Segmentation.probability_dtype, choices=list(PROBABILITY_DTYPES),
        help="how the probabilities are stored: float32, or uint8 (p x 254 rounded, 255 nodata, with the "
        f"GeoTIFF band scale 1/254; a quarter of the size) (default: {Segmentation.probability_dtype})",
    )  # fmt: skip
    seg.add_argument(
        "--polygons", metavar="OUT", help="also write one polygon per connected region of each class, with its "
        "measurements: .geojson (QuPath annotations for slides, WGS84 for rasters), .gpkg or .fgb; a format alone "
        "(geojson, gpkg, fgb) writes OUT.polygons.FORMAT beside the class map (in a cohort: beside each image's)",
    )  # fmt: skip
    seg.add_argument(
        "--exclude-classes", nargs="*", metavar="NAME",
        help="classes that get no polygons (default: background, _background_, unlabeled; none: no names)",
    )  # fmt: skip
    seg.add_argument(
        "--min-area", default="0", metavar="AREA",
        help="drop smaller regions: a number in um2 (slides with a resolution), m2 (rasters in a metric CRS) or "
        "level-0 pixels otherwise, or with a unit: 50um2, 2m2, 100px (px: class-map pixels) (default: 0)",
    )  # fmt: skip
    seg.add_argument(
        "--simplify", type=float, default=0.0, metavar="TOL",
        help="topology-preserving simplification tolerance in class-map pixels (default: 0, exact pixel outlines)",
    )  # fmt: skip
    seg.add_argument(
        "--connectivity", type=int, default=4, choices=(4, 8),
        help="pixels touching at a corner are one region with 8, separate with 4, as in rasterio (default: 4)",
    )  # fmt: skip
    seg.add_argument(
        "--native-crs", action="store_true", help="rasters: GeoJSON polygons in the raster's CRS instead of WGS84"
    )
    seg.set_defaults(func=cmd_segment)

    for name, text in (
        ("detect", "detect objects over a whole slide or scene with an mmdetection model"),
        ("instances", "instance masks over a whole slide or scene: detector boxes prompting SAM"),
    ):
        det = sub.add_parser(name, help=text)
        det.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
        det.add_argument(
            "-o", "--out", required=True,
            help="objects (.geojson), summary and preview beside it; for a cohort, the folder they all go into",
        )  # fmt: skip
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
        _add_tiling_args(det, DETECTION_TILING)
        det.add_argument(
            "--score-threshold", type=float, default=Detection.score_threshold,
            help=f"drop detections below (default: {Detection.score_threshold})",
        )  # fmt: skip
        det.add_argument(
            "--merge", default=Detection.merge, choices=MERGE_METHODS,
            help=f"how detections of one object from overlapping tiles are merged (default: {Detection.merge})",
        )  # fmt: skip
        det.add_argument(
            "--match", default=Detection.match, choices=MATCH_CRITERIA,
            help=f"match by intersection over union, or over the smaller box (default: {Detection.match})",
        )  # fmt: skip
        det.add_argument(
            "--match-threshold", type=float, default=Detection.match_threshold,
            help=f"match above this (default: {Detection.match_threshold})",
        )  # fmt: skip
        det.add_argument("--class-agnostic", action="store_true", help="merge detections of different classes too")
        det.add_argument(
            "--overview", action="store_true",
            help="also detect on the whole image shrunk to one tile, for objects larger than the overlap",
        )  # fmt: skip
        det.add_argument(
            "--coco", nargs="?", const="", metavar="RESULTS_JSON",
            help="also write COCO results JSON (level-0 pixels); alone: beside the objects, as OUT.coco.json",
        )  # fmt: skip
        det.add_argument(
            "--native-crs", action="store_true", help="rasters: keep the raster's CRS instead of WGS84 lon/lat"
        )
        det.set_defaults(func=cmd_detect)

    from densevision.demo import SIZES

    demo = sub.add_parser("demo", help="the main job on generated big images from the sample data, scored")
    demo.add_argument("--data", help="sample data folder (default: the samples shipped with densevision)")
    demo.add_argument("-o", "--out", help="output folder (default: outputs/demo)")
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
    from densevision.cli.train import add_test_arguments, add_train_arguments, run_test, run_train

    train = sub.add_parser("train", help="fine-tune an mmdet / mmseg config on COCO- or ADE20k-format data")
    add_train_arguments(train, flags=True).set_defaults(func=run_train)
    test = sub.add_parser("test", help="evaluate a checkpoint: COCO bbox / segm mAP, or ADE20k mIoU")
    add_test_arguments(test, flags=True).set_defaults(func=run_test)
    for command in sub.choices.values():  # -v after the command too (SUPPRESS: absent, it keeps the top level's)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE)
    return parser


def log_path(args: argparse.Namespace) -> Path:
    """Where a command's library logs go: beside its outputs (each rank of a torchrun its own file)."""
    rank = int(os.environ.get("RANK", "0"))
    suffix = ".log" if rank == 0 else f".rank{rank}.log"
    if args.command in ("segment", "detect", "instances"):
        if is_cohort(args):
            return Path(args.out) / f"cohort{suffix}"
        stem = Path(args.out).with_suffix("")
        return stem.with_name(stem.name + suffix)
    if args.command == "demo":
        return Path(args.out or "outputs/demo") / f"demo{suffix}"
    if args.command == "train" and getattr(args, "work_dir", None):
        return Path(args.work_dir) / f"densevision{suffix}"
    return default_log_dir() / f"{args.command}{suffix}"


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Run a parsed command with the libraries' output in its log file. Bad input (a :class:`DenseVisionError`):
    one line ``PROG: error: ...``, exit 2. Anything else is a bug: one line naming the log file, which holds the
    traceback (shown too with ``-v``), exit 1."""
    log = LogFile(log_path(args))
    try:
        with library_output(log, verbose=bool(getattr(args, "verbose", False))):
            try:
                return int(func(args))
            except (DenseVisionError, KeyboardInterrupt):
                raise
            except Exception:
                traceback.print_exc(file=sys.stdout)  # into the log (and the terminal with -v)
                raise
    except DenseVisionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"{prog}: internal error: {type(e).__name__}: {e} (the traceback is in {log.path})", file=sys.stderr)
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, "densevision")


if __name__ == "__main__":
    sys.exit(main())
