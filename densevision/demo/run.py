"""``densevision demo``: the main job end to end on real sample data, with nothing downloaded.

1. Small default models: the configs in ``configs/demo/`` trained on crops of generated images (or taken from the
   cache, see :mod:`densevision.demo.models`).
2. A large pyramidal slide built from real H&E tissue and a large GeoTIFF built from a real Landsat scene, both with
   objects planted at known places (:mod:`densevision.synthetic.scenes`), from the samples the package ships
   (:mod:`densevision.samples`) or from ``--data DIR``.
3. The slide segmented and the scene's objects detected, tile by tile, by the library's own
   :func:`~densevision.apis.segment.segment_image` / :func:`~densevision.apis.detect.detect_objects` (and, with a
   SAM checkpoint, :func:`~densevision.apis.detect.segment_instances`).
4. The outputs scored against the planted truth (:mod:`densevision.demo.score`) into ``demo_summary.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from densevision.apis.job import versions
from densevision.demo.models import TrainedModel, TrainSpec, default_cache_dir, obtain_model
from densevision.demo.score import detection_scores, segmentation_scores
from densevision.errors import ConfigError, OutputError
from densevision.io.atomic import write_json
from densevision.synthetic.scenes import SceneSpec, build, find_sources, write_truth

DEFAULT_OUT = Path("outputs") / "demo"  # relative to the current folder
Size = Literal["tiny", "small", "full"]

# Object sides in pixels and objects per megapixel. Slide objects are large enough to survive the tissue mask's
# smoothing on a 1024-px thumbnail of a 16384-px slide (the engine skips tiles the mask calls glass); the demo slide
# holds fewer of them than its training slide, so that most of its glass is skipped, as on a real slide.
SLIDE_OBJECTS, SLIDE_DENSITY, SLIDE_TRAIN_DENSITY = (96, 192), 1.5, 4.5
SCENE_OBJECTS, SCENE_DENSITY = (24, 64), 90.0
# Crops the models are trained on; the detector sees tiles of the same size (DINO's normalised positions and
# query count do not carry over to larger tiles: recall fell from 0.91 to 0.26 at 512 px after 256-px training).
CROP = 256


def _slide(size: int, seed: int, density: float) -> SceneSpec:
    return SceneSpec("slide", size, size, round(size * size * density / 1e6), SLIDE_OBJECTS, seed)


def _scene(size: int, seed: int, collar: int = 0) -> SceneSpec:
    inner = (size - 2 * collar) ** 2
    return SceneSpec("geotiff", size, size, round(inner * SCENE_DENSITY / 1e6), SCENE_OBJECTS, seed, collar)


@dataclass(frozen=True)
class Preset:
    """Everything a demo size fixes: the two demo images, how their models are trained, and the tiling."""

    slide: SceneSpec
    scene: SceneSpec
    segmentation: TrainSpec
    detection: TrainSpec
    seg_tile: int = 512
    seg_overlap: int = 64
    det_tile: int = CROP
    det_overlap: int = SCENE_OBJECTS[1]  # every object lies whole in some tile


def _preset(slide: int, scene: int, train_slide: int, train_scene: int, seg_iters: int, det_iters: int) -> Preset:
    """Demo images of ``slide`` / ``scene`` pixels; models trained on images of ``train_slide`` / ``train_scene``
    pixels from other seeds (same object sizes and colours)."""
    return Preset(
        _slide(slide, 1, SLIDE_DENSITY),
        _scene(scene, 2, collar=scene // 32),
        TrainSpec("segmentation", _slide(train_slide, 101, SLIDE_TRAIN_DENSITY), seg_iters, crop=CROP, stride=128),
        TrainSpec("detection", _scene(train_scene, 102), det_iters, crop=CROP, stride=128),
    )


PRESETS: dict[Size, Preset] = {
    "tiny": _preset(2048, 1024, 1024, 512, 2, 2),  # seconds, for tests: the models barely learn
    "small": _preset(8192, 4096, 4096, 2048, 300, 200),
    "full": _preset(16384, 8192, 4096, 2048, 300, 200),
}


def _fresh(path: Path) -> Path:
    """``path`` with the work folder an interrupted earlier demo run may have left beside it removed (the demo
    regenerates its inputs, so that folder could not be resumed)."""
    shutil.rmtree(path.with_name(path.name + ".partial.d"), ignore_errors=True)
    return path


def _model_facts(model: TrainedModel) -> dict[str, Any]:
    r = model.record
    return {
        "config": str(model.config),
        "checkpoint": str(model.checkpoint),
        "from_cache": model.cached,
        "trained_with": r["config"],
        "iterations": r["iterations"],
        "training_images": r["images"],
        "loss_first": r["loss_first"],
        "loss_last": r["loss_last"],
        "val_metrics": r["val_metrics"],
        "seconds_training": r["seconds_total"],
    }


def run_demo(
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    size: Size = "small",
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    sam_checkpoint: str | Path | None = None,
    device: str = "auto",
    workers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo (see the module doc) and return its summary, also written to ``<out>/demo_summary.json``.

    Args:
        data: a sample-data folder holding ``wsi/CMU-1-Small-Region.svs`` and ``geotiff/RGB.byte.tif``; default:
            the copies shipped with the package (:mod:`densevision.samples`).
        out: output folder (default ``outputs/demo`` in the current folder).
        size: ``small`` (8192^2 slide, 4096^2 scene; the default), ``full`` (16384^2, 8192^2) or ``tiny`` (tests).
        cache_dir: trained-model cache (default ``${XDG_CACHE_HOME:-~/.cache}/densevision/demo``).
        retrain: train even when the cache has the models.
        sam_checkpoint: an official SAM checkpoint: also segment the scene's objects with box-prompted SAM.

    Raises:
        ImageNotFoundError: the sample data is missing. OutputError: ``out`` or the cache cannot be written.
    """
    started = time.perf_counter()
    if size not in PRESETS:
        raise ConfigError(f"demo size must be one of {', '.join(PRESETS)}, got {size!r}")
    preset = PRESETS[size]
    sources = find_sources(data)
    from densevision.apis.detect import detect_objects, segment_instances
    from densevision.apis.segment import segment_image

    out_dir = Path(out) if out is not None else Path.cwd() / DEFAULT_OUT
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the demo output folder ({e.strerror}); pass --out DIR") from e
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    t = time.perf_counter()
    seg_model = obtain_model(preset.segmentation, sources, cache, retrain=retrain, log=log)
    timed("segmentation_model", t)
    t = time.perf_counter()
    det_model = obtain_model(preset.detection, sources, cache, retrain=retrain, log=log)
    timed("detection_model", t)

    slide, scene = out_dir / "slide.tiff", out_dir / "scene.tif"
    t = time.perf_counter()
    log(f"building the {preset.slide.width} x {preset.slide.height} slide from {sources.slide} ...")
    slide_objects = build(preset.slide, slide, sources)
    write_truth(out_dir / "slide.truth.json", preset.slide, slide_objects)
    timed("build_slide", t)
    t = time.perf_counter()
    log(f"building the {preset.scene.width} x {preset.scene.height} GeoTIFF from {sources.geotiff} ...")
    scene_objects = build(preset.scene, scene, sources)
    write_truth(out_dir / "scene.truth.json", preset.scene, scene_objects)
    timed("build_scene", t)

    common: dict[str, Any] = {"device": device, "workers": workers, "progress": progress}
    t = time.perf_counter()
    log("segmenting the slide ...")
    seg = segment_image(
        slide, seg_model.config, seg_model.checkpoint, out=_fresh(out_dir / "slide.classes.tif"),
        tile=preset.seg_tile, overlap=preset.seg_overlap, **common,
    )  # fmt: skip
    timed("segment", t)
    t = time.perf_counter()
    log("detecting objects in the scene ...")
    det = detect_objects(
        scene, det_model.config, det_model.checkpoint, out=_fresh(out_dir / "scene.objects.geojson"),
        coco_out=out_dir / "scene.objects.coco.json", tile=preset.det_tile, overlap=preset.det_overlap, **common,
    )  # fmt: skip
    timed("detect", t)
    instances = None
    if sam_checkpoint is not None:
        t = time.perf_counter()
        log("segmenting the scene's objects with box-prompted SAM ...")
        instances = segment_instances(
            scene, det_model.config, det_model.checkpoint, out=_fresh(out_dir / "scene.instances.geojson"),
            sam_checkpoint=sam_checkpoint, coco_out=out_dir / "scene.instances.coco.json",
            tile=preset.det_tile, overlap=preset.det_overlap, **common,
        )  # fmt: skip
        timed("instances", t)

    t = time.perf_counter()
    seg_classes = tuple(seg["model"]["classes"])
    seg_scores = segmentation_scores(seg["output"], slide_objects, seg_classes)
    det_scores = detection_scores(det["coco"], scene_objects, tuple(det["model"]["classes"]))
    timed("score", t)
    timings["total"] = round(time.perf_counter() - started, 2)

    summary: dict[str, Any] = {
        "size": size,
        "data": {"slide": str(sources.slide), "geotiff": str(sources.geotiff)},
        "segmentation": {
            "input": str(slide),
            "truth": str(out_dir / "slide.truth.json"),
            "scene": dataclasses.asdict(preset.slide),
            "output": seg["output"],
            "preview": seg["preview"],
            "summary": seg["summary"],
            "tiles": seg["tiles"],
            "model": _model_facts(seg_model),
            "scores": seg_scores,
        },
        "detection": {
            "input": str(scene),
            "truth": str(out_dir / "scene.truth.json"),
            "scene": dataclasses.asdict(preset.scene),
            "output": det["output"],
            "coco": det["coco"],
            "preview": det["preview"],
            "summary": det["summary"],
            "tiles": det["tiles"],
            "model": _model_facts(det_model),
            "scores": det_scores,
        },
        "instances": (
            {"output": instances["output"], "preview": instances["preview"], "summary": instances["summary"]}
            if instances is not None
            else None
        ),
        "models_from_cache": seg_model.cached and det_model.cached,
        "timings": timings,
        "versions": versions(),
    }
    path = out_dir / "demo_summary.json"
    summary["summary"] = str(path)
    write_json(path, summary)
    return summary


def report(summary: dict[str, Any]) -> list[str]:
    """The lines ``densevision demo`` prints: scores and where everything is."""
    seg, det = summary["segmentation"], summary["detection"]
    s, d = seg["scores"], det["scores"]
    ious = ", ".join(f"{k} {v:.3f}" for k, v in s["iou"].items() if v is not None)
    lines = [
        f"models: {'from the cache' if summary['models_from_cache'] else 'trained now'} "
        f"({seg['model']['checkpoint']}, {det['model']['checkpoint']})",
        f"slide:        {seg['input']} (truth: {seg['truth']})",
        f"segmentation: {seg['output']}",
        f"  preview:    {seg['preview']}",
        f"  IoU:        {ious}; mean over planted classes {s['mean_iou_objects'] or 0:.3f}",
        f"scene:        {det['input']} (truth: {det['truth']})",
        f"detections:   {det['output']} (COCO results: {det['coco']})",
        f"  preview:    {det['preview']}",
        f"  at IoU {d['iou_threshold']}: precision {d['precision'] or 0:.3f}, recall {d['recall'] or 0:.3f}, "
        f"F1 {d['f1'] or 0:.3f} ({d['tp']} of {d['objects']} objects found, {d['detections']} detections)",
    ]
    if summary["instances"]:
        lines += [f"instances:    {summary['instances']['output']}", f"  preview:    {summary['instances']['preview']}"]
    t = summary["timings"]
    lines.append(
        f"time:         {t['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total") + ")"
    )
    lines.append(f"summary:      {summary['summary']}")
    return lines
