"""``detect_objects`` and ``segment_instances``: a whole slide or scene through a detector (and a box-prompted mask
model), objects merged across tiles into whole-image features.

The detection task of :func:`~densevision.apis.job.run_job`. Its consumer: each tile row's raw detections (level-0
boxes, scores, labels, mask polygons) are committed to the work folder as the row completes, so a killed run resumes
where it stopped and ranks of a ``torchrun`` each do a share of the rows. Its finishing step (rank 0): the rows fed
to the streaming :class:`~densevision.stitch.DetectionMerger`, each finished object written (or, with the overview or
SAM, the merged objects gathered first), the preview.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from PIL import Image, ImageDraw

from densevision.apis.job import Job, Task, area_per_pixel, run_job, save_preview, stretch_for_display
from densevision.apis.settings import (
    DETECTION_TILING,
    Compute,
    Detection,
    Model,
    Reading,
    Tiling,
    gather,
    refuse_unknown,
)
from densevision.compat import trusted_checkpoints
from densevision.engine.reader import TileDataset, window_loader
from densevision.engine.runner import BackgroundCalls, RunStats, TileRunner, batch_aligned
from densevision.engine.workdir import RecordFolder, WorkFolder
from densevision.errors import ConfigError
from densevision.io import CocoResultsWriter, GeoJsonWriter, ImageSource
from densevision.io.atomic import check_output_path
from densevision.io.scaling import ValueScale
from densevision.predictors.base import DetectionPredictor, TileDetections
from densevision.stitch import DetectionMerger, Detections, merge_detections
from densevision.stitch.instances import PromptWindow, mask_to_polygons, merge_instance_polygons, prompt_windows
from densevision.stitch.measure import Units, measure, qupath_names, rows, units_of
from densevision.tiling import TileGrid


def _measured(geoms: Sequence[shapely.Geometry], units: Units, *, descriptors: bool) -> list[dict[str, float]]:
    """Each object's measurements (:mod:`densevision.stitch.measure`): area and perimeter, and with
    ``descriptors`` (outlines from masks) solidity, circularity and elongation."""
    return rows(measure(list(geoms), units, descriptors=descriptors))


def _polygons_wkb(geoms: Sequence[shapely.Geometry]) -> dict[str, np.ndarray]:
    """Geometries as one byte array + offsets (npz holds no objects without pickle)."""
    blobs = [shapely.to_wkb(g) for g in geoms]
    offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
    return {"wkb": np.frombuffer(b"".join(blobs), dtype=np.uint8), "wkb_offsets": offsets}


def _from_wkb(record: dict[str, np.ndarray]) -> list[shapely.Geometry]:
    data, offsets = record["wkb"].tobytes(), record["wkb_offsets"]
    return [shapely.from_wkb(data[a:b]) for a, b in itertools.pairwise(offsets)]


class _RowRecorder:
    """Collects tile detections row by row (tiles arrive in row-major order) and commits each finished row.

    A row's record (mask polygons traced, compressed, written) is made on one background thread, in row order,
    beside the model's next batches; :meth:`close` waits for the rows handed over and raises the first error."""

    def __init__(self, work: RecordFolder, first: int, downsample: float, with_masks: bool) -> None:
        self.work, self.next_row, self.d, self.with_masks = work, first, downsample, with_masks
        self.parts: list[tuple[int, TileDetections, int, int]] = []
        self.writer = BackgroundCalls()

    def add(self, row: int, tile_index: int, dets: TileDetections, x: int, y: int) -> None:
        self.commit_until(row)
        self.parts.append((tile_index, dets, x, y))

    def commit_until(self, row: int) -> None:
        while self.next_row < row:
            self.writer.submit(self._commit, self.next_row, self.parts)
            self.parts = []
            self.next_row += 1

    def close(self) -> None:
        self.writer.close()

    def _commit(self, row: int, parts: list[tuple[int, TileDetections, int, int]]) -> None:
        d = self.d
        n = [len(p[1]) for p in parts]
        shifts = [np.array([x, y, x, y], dtype=np.float64) for _, _, x, y in parts]
        rec: dict[str, np.ndarray] = {
            "tile": np.repeat(np.array([p[0] for p in parts], dtype=np.int64), n),
            "boxes": np.concatenate(
                [(p[1].boxes + s) * d for p, s in zip(parts, shifts, strict=True)] or [np.zeros((0, 4))]
            ),
            "scores": np.concatenate([p[1].scores for p in parts] or [np.zeros(0)]),
            "labels": np.concatenate([p[1].labels for p in parts] or [np.zeros(0, np.int64)]).astype(np.int64),
        }
        if self.with_masks:
            geoms = [
                mask_to_polygons(m, offset=(x * d, y * d), scale=d)
                for _, dets, x, y in parts
                for m in (dets.masks if dets.masks is not None else np.zeros((len(dets), 1, 1), bool))
            ]
            rec.update(_polygons_wkb(geoms))
        self.work.put(row, rec)


class _ObjectOutputs:
    """Merged objects to GeoJSON (+ COCO results), per-class counts and the preview drawing."""

    def __init__(
        self,
        src: ImageSource,
        geojson: GeoJsonWriter,
        coco: CocoResultsWriter | None,
        names: Sequence[str],
        palette: Sequence[tuple[int, int, int]],
        preview: Image.Image,
        preview_scale: tuple[float, float],
    ) -> None:
        self.src, self.geojson, self.coco, self.names, self.palette = src, geojson, coco, names, palette
        self.counts = np.zeros(len(names), dtype=np.int64)
        self.units = units_of(src)  # of level-0 pixels
        self.area, self.perimeter = np.zeros(len(names)), np.zeros(len(names))
        self.partial = 0
        self.count = 0
        self.draw = ImageDraw.Draw(preview)
        self.preview_scale = preview_scale

    def add_all(self, dets: Detections, polygons: dict[int, shapely.Geometry] | None) -> None:
        """Every object of ``dets``, outlined by the union of its sources' ``polygons`` (by id) when given, else by
        its box."""
        for k in range(len(dets)):
            geom = _united(polygons, dets.sources(k)) if polygons is not None else None
            self.add(
                dets.boxes[k], dets.scores[k], int(dets.labels[k]), bool(dets.partial[k]), len(dets.sources(k)), geom
            )

    def add(self, box: np.ndarray, score: float, label: int, partial: bool, views: int, geom: Any) -> None:
        k = self.count
        self.count += 1
        self.counts[label] += 1
        self.partial += int(partial)
        name = self.names[label]
        shape = geom if geom is not None else shapely.box(*box)
        measured = _measured([shape], self.units, descriptors=geom is not None)[0]
        self.area[label] += measured[self.units.area_key]
        self.perimeter[label] += measured[self.units.perimeter_key]
        if self.geojson.pixel_coordinates:
            self.geojson.add_qupath(
                shape, object_type="detection", classification=name, color=self.palette[label],
                measurements={"score": round(float(score), 6), **qupath_names(measured)}, id=k,
            )  # fmt: skip
        else:
            props = {"class": name, "label": int(label), "score": round(float(score), 6), "partial": bool(partial)}
            self.geojson.add(shape, {**props, "views": int(views), **measured}, id=k)
        if self.coco is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            seg = _coco_segmentation(geom, self.src.size) if geom is not None else None
            self.coco.add(1, int(label), float(score), [x0, y0, x1 - x0, y1 - y0], segmentation=seg)
        sx, sy = self.preview_scale
        outline = tuple(self.palette[label])
        self.draw.rectangle([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], outline=outline, width=1)


def _coco_segmentation(geom: shapely.Geometry, image_size: tuple[int, int]) -> dict[str, Any] | None:
    """COCO RLE of a level-0 polygon, rasterised over its bounding box only."""
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    from densevision.io.writers.coco import mask_to_rle

    if geom.is_empty:
        return None
    W, H = image_size
    x0, y0, x1, y1 = geom.bounds
    x0, y0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    x1, y1 = min(W, math.ceil(x1)), min(H, math.ceil(y1))
    if x1 <= x0 or y1 <= y0:
        return None
    mask = rasterize([geom], out_shape=(y1 - y0, x1 - x0), transform=Affine.translation(x0, y0), dtype=np.uint8)
    return mask_to_rle(mask.astype(bool), (x0, y0), (W, H))


def _united(polygons: dict[int, shapely.Geometry], ids: np.ndarray) -> shapely.Geometry:
    """One object's outline: the union of its sources' (pieces cut by tile borders join)."""
    return merge_instance_polygons(polygons.get(int(i)) for i in ids)


def _overview(
    src: ImageSource,
    predictor: DetectionPredictor,
    tile: int,
    min_side: float,
    value_scale: ValueScale | None,
    with_masks: bool,
) -> tuple[Detections, list[shapely.Geometry]]:
    """The detector once over the whole image shrunk to fit one tile; boxes (and outlines) in level-0 pixels. Only
    objects with a side of at least ``min_side`` level-0 pixels are kept: smaller ones fit in the tiles' overlap,
    which see them whole and sharper."""
    thumb = src.thumbnail(tile)
    h, w = thumb.valid.shape
    pixels = value_scale(thumb.pixels) if value_scale is not None else thumb.pixels.astype(np.float32)
    canvas = np.zeros((tile, tile, pixels.shape[-1]), dtype=np.float32)  # padding, as for a tile past the edge
    canvas[:h, :w] = np.where(thumb.valid[..., None], pixels, 0)
    batch = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None].to(predictor.device)
    dets = predictor(batch)[0]
    sx, sy = thumb.downsample
    W, H = src.size
    boxes = np.clip(dets.boxes * [sx, sy, sx, sy], 0, [W, H, W, H])
    big = np.flatnonzero(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= min_side)
    geoms = []
    if with_masks and dets.masks is not None:
        geoms = [mask_to_polygons(dets.masks[i, :h, :w], scale=(sx + sy) / 2) for i in big]
    n = len(big)
    found = Detections(
        boxes=boxes[big], scores=dets.scores[big].astype(np.float64), labels=dets.labels[big].astype(np.int64),
        best=np.arange(n), partial=np.zeros(n, dtype=bool), offsets=np.arange(n + 1), members=np.arange(n),
    )  # fmt: skip
    return found, geoms


def _join_overview(
    objects: Detections,
    geoms: list[shapely.Geometry],
    overview: Detections,
    overview_geoms: list[shapely.Geometry],
    size: tuple[int, int],
    merge_options: dict[str, Any],
) -> tuple[Detections, dict[int, shapely.Geometry]]:
    """Merge the tiles' objects with the overview's detections (ids: objects first, then the overview's), by the
    same rules, over one window covering the image. An object is partial when no overview detection joined it and
    all its tile objects were partial."""
    whole = TileGrid(size[0], size[1], max(size))
    k = len(objects)
    boxes = np.concatenate([objects.boxes, overview.boxes])
    scores = np.concatenate([objects.scores, overview.scores])
    labels = np.concatenate([objects.labels, overview.labels])
    was_partial = np.concatenate([objects.partial, np.zeros(len(overview), dtype=bool)])
    # A partial view ranks below a whole one, as within the tiles: the overview's view of a big object then leads
    # its group and gathers the pieces the tiles saw.
    rank = np.where(was_partial, scores * 0.5, scores)
    joined = merge_detections(whole, [(next(iter(whole)), boxes, rank, labels)], **merge_options)
    members = [joined.sources(j) for j in range(len(joined))]
    partial = np.array([bool(was_partial[m].all()) for m in members], dtype=bool)
    best_score = np.array([scores[m].max() for m in members], dtype=np.float64)
    polygons = dict(enumerate(geoms))
    polygons.update({k + i: g for i, g in enumerate(overview_geoms)})
    return dataclasses.replace(joined, partial=partial, scores=best_score), polygons


def _merge_rows(
    work: RecordFolder,
    grid: TileGrid,
    keep: np.ndarray,
    downsample: float,
    with_masks: bool,
    merge_options: dict[str, Any],
    emit: Callable[[Detections, dict[int, shapely.Geometry]], None],
) -> DetectionMerger:
    """Feed the committed rows to the merger; ``emit`` gets each batch of finished objects with the polygons of
    their source detections (by id) when the detector gave masks."""
    polygons: dict[int, shapely.Geometry] = {}

    def sink(dets: Detections) -> None:
        emit(dets, polygons)
        for k in range(len(dets)):
            for i in dets.sources(k):
                polygons.pop(int(i), None)

    merger = DetectionMerger(grid, sink, scale=downsample, **merge_options)
    tiles = list(grid)
    cols = len(grid.xs)
    for row in range(len(grid.ys)):
        rec = work.get(row)
        ids = merger.added + np.arange(len(rec["tile"]))
        if with_masks:
            polygons.update(zip(ids.tolist(), _from_wkb(rec), strict=True))
        for t in tiles[row * cols : (row + 1) * cols]:
            if not keep[t.index]:
                merger.skip(t)
                continue
            sel = rec["tile"] == t.index
            merger.add(t, rec["boxes"][sel], rec["scores"][sel], rec["labels"][sel], ids[sel])
    merger.finish()
    return merger


class DetectionTask(Task):
    """Merged objects of a whole image (boxes, and outlines from masks); see the module doc."""

    empty_note = "no tile has content (all glass or nodata): no objects"

    def __init__(
        self, settings: Detection, predictor: DetectionPredictor | None = None, sam_predictor: Any = None
    ) -> None:
        self.settings = settings.check()
        self.coco_path = check_output_path(settings.coco_out) if settings.coco_out is not None else None
        self._predictor = predictor
        self._built = False
        self.sam: Any = sam_predictor if settings.masks is not False else None
        self.with_masks = False  # the detector's own masks outline the objects (known once the predictor is)

    def check_output(self, out: Path) -> None:
        if out.suffix.lower() not in (".geojson", ".json"):
            raise ConfigError(f"{out}: detections are written as GeoJSON; name the output *.geojson")

    def predictor(self, model: Model, device: torch.device) -> DetectionPredictor:
        if self._built and self._predictor is not None:
            return self._predictor
        s = self.settings
        with trusted_checkpoints(model.trust_checkpoint):
            if self._predictor is None:
                if model.config is None:
                    raise ConfigError("detect_objects needs a model: pass a config (-c) or a predictor")
                from densevision.predictors.mmdet import MMDetPredictor

                self._predictor = MMDetPredictor.from_config(
                    model.config, model.checkpoint, device=device, cfg_options=model.cfg_options,
                    score_threshold=s.score_threshold,
                )  # fmt: skip
            if self.sam is None and s.sam_checkpoint is not None and s.masks is not False:
                from densevision.predictors.sam import SamBoxPredictor

                self.sam = SamBoxPredictor.from_checkpoint(s.sam_checkpoint, device=device)
        if s.masks and self.sam is None and not self._predictor.has_masks:
            raise ConfigError("the detector has no mask head: give a SAM checkpoint (--sam) to get instance masks")
        self.with_masks = self._predictor.has_masks and self.sam is None and s.masks is not False
        self._built = True
        return self._predictor

    def fingerprint(self, job: Job) -> dict[str, Any]:
        return {"score_threshold": self.settings.score_threshold, "masks": self.with_masks}

    def work_folder(self, job: Job, root: Path, fingerprint: dict[str, Any], resume: bool) -> RecordFolder:
        return RecordFolder(root, fingerprint, resume=resume, rows=len(job.grid.ys))

    def predict(
        self, job: Job, work: WorkFolder, rows: tuple[int, int], dataset: TileDataset, runner: TileRunner
    ) -> RunStats | None:
        """Predict the tile rows ``[a, b)`` not yet in ``work``, committing each row as it finishes."""
        assert isinstance(work, RecordFolder)
        first, end = rows[0] + work.done(rows[0]), rows[1]
        if first >= end:
            return None
        tiles = list(job.grid)
        dataset.tiles = batch_aligned([t for t in tiles if job.keep[t.index]], (first, end), runner.batch_size)
        recorder = _RowRecorder(work, first, job.geometry.downsample, self.with_masks)

        def consume(indexes: list[int], dets: list[TileDetections], valid: np.ndarray) -> None:
            for i, d in zip(indexes, dets, strict=True):
                t = tiles[i]
                if first <= t.row < end:  # the others were only computed to keep the batches aligned
                    recorder.add(t.row, t.index, d, t.x, t.y)

        try:
            stats = runner.run(dataset, self.predictor(job.model, job.device), consume) if len(dataset) else None
            recorder.commit_until(end)
        finally:
            recorder.close()  # the rows handed over are committed, also when the run fails (resume starts after)
        return stats

    def finishes_alongside(self, job: Job) -> bool:
        # SAM and the overview run models in the finishing step: that stays in the process that holds the model.
        return self.sam is None and not self.settings.overview

    def finish(self, job: Job, work: WorkFolder) -> dict[str, Any]:
        """Merge the committed rows into objects and write them (GeoJSON, COCO results, the preview)."""
        assert isinstance(work, RecordFolder)
        src, grid, geometry, s = job.src, job.grid, job.geometry, self.settings
        predictor = self.predictor(job.model, job.device)
        names, with_masks, merge_options = list(predictor.class_names), self.with_masks, s.merge_options
        merge_started = time.perf_counter()
        overview_count = None
        thumb = job.thumb
        preview = Image.fromarray(stretch_for_display(thumb.pixels).astype(np.uint8))
        preview_scale = (1 / thumb.downsample[0], 1 / thumb.downsample[1])
        transform = src.transform if src.backend == "rasterio" else None
        native_crs = s.native_crs and src.crs is not None
        geojson = GeoJsonWriter(
            job.out, transform=transform, crs=src.crs if transform is not None else None, native_crs=native_crs
        )
        coco = CocoResultsWriter(self.coco_path) if self.coco_path is not None else None
        outputs = _ObjectOutputs(src, geojson, coco, names, predictor.palette, preview, preview_scale)
        sam_seconds, sam_windows = 0.0, 0
        with contextlib.ExitStack() as writers:  # each writer renamed into place on success, dropped on error
            writers.enter_context(geojson)
            if coco is not None:
                writers.enter_context(coco)
            if self.sam is None and not s.overview:
                # Stream: each finished object is written as soon as the merger lets it go.
                def emit(dets: Detections, polygons: dict[int, shapely.Geometry]) -> None:
                    outputs.add_all(dets, polygons if with_masks else None)

                merger = _merge_rows(work, grid, job.keep, geometry.downsample, with_masks, merge_options, emit)
            else:
                # Collect the (small) merged boxes: the overview joins them, and SAM needs them all to place windows.
                found: list[Detections] = []
                geoms: list[shapely.Geometry] = []

                def collect(dets: Detections, polygons: dict[int, shapely.Geometry]) -> None:
                    found.append(dets)
                    if with_masks:
                        geoms.extend(_united(polygons, dets.sources(k)) for k in range(len(dets)))

                merger = _merge_rows(work, grid, job.keep, geometry.downsample, with_masks, merge_options, collect)
                objects = Detections.concatenate(found)
                polygons: dict[int, shapely.Geometry] = {}
                if s.overview:
                    ov, ov_geoms = _overview(
                        src, predictor, grid.tile, grid.overlap * geometry.downsample, job.value_scale, with_masks
                    )
                    overview_count = len(ov)
                    objects, polygons = _join_overview(objects, geoms, ov, ov_geoms, src.size, merge_options)
                if self.sam is None:
                    outputs.add_all(objects, polygons if with_masks else None)
                else:
                    sam_started = time.perf_counter()
                    sam_windows = _prompt_sam(job, objects, self.sam, outputs)
                    sam_seconds = time.perf_counter() - sam_started
            work.wait_until_complete()  # before the writers rename their files into place
        merge_seconds = time.perf_counter() - merge_started - sam_seconds
        preview_path = job.beside(".preview.png")
        save_preview(preview_path, preview)
        area = area_per_pixel(src, 1.0)
        coordinates = (
            "level-0 pixels (QuPath)" if transform is None
            else str(src.crs) if native_crs else "EPSG:4326 (longitude, latitude)"
        )  # fmt: skip
        return {
            "outputs": {
                "coco": str(self.coco_path) if self.coco_path else None, "preview": str(preview_path),
                "coordinates": coordinates,
            },
            "model": {
                "masks": "sam" if self.sam is not None else "detector" if with_masks else None,
                "sam_checkpoint": os.fspath(s.sam_checkpoint) if s.sam_checkpoint else None,
            },
            "settings": {"score_threshold": s.score_threshold, **merge_options, "overview": s.overview},
            "results": {
                "detections": {
                    "raw": merger.added, "overview": overview_count, "objects": outputs.count,
                    "partial": outputs.partial, "max_held": merger.max_held,
                },
                "classes": [
                    {"index": i, "name": n, "count": int(outputs.counts[i]), outputs.units.area_key: outputs.area[i],
                     outputs.units.perimeter_key: outputs.perimeter[i]}
                    for i, n in enumerate(names)
                ],
                "pixel_area": {"value": area[0], "unit": area[1]} if area else None,
            },
            "timings": {"seconds_merging": merge_seconds, "seconds_sam": sam_seconds, "sam_windows": sam_windows},
        }  # fmt: skip


def detect_objects(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    predictor: DetectionPredictor | None = None,
    sam_predictor: Any = None,
    model: Model | None = None,
    tiling: Tiling | None = None,
    reading: Reading | None = None,
    compute: Compute | None = None,
    detection: Detection | None = None,
    resume: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Detect objects over a whole image tile by tile and write the merged objects as GeoJSON.

    Rasters: features in WGS84 longitude / latitude (RFC 7946), or with ``native_crs`` in the raster's CRS.
    Slides and plain images: QuPath detection objects in level-0 pixels. Beside ``out``: ``*.summary.json`` (counts
    per class, tiles, timings) and ``*.preview.png`` (boxes on a thumbnail); ``coco_out``: COCO results JSON in
    level-0 pixels (``image_id`` 1, ``category_id`` = class index). Objects cut by tile borders are merged
    (``merge`` nms / nmm / greedy_nmm, matching by ``match`` iou / ios above ``match_threshold``, see
    :mod:`densevision.stitch.detection`); make ``overlap`` at least the size of the largest object, or add
    ``overview``: one more pass of the detector over the whole image shrunk to one tile, whose detections are
    merged with the tiles' (for objects larger than the overlap; its boxes are as coarse as its resolution).

    Give ``config`` (a path or a shipped config's name) + ``checkpoint`` for an mmdet detector, or a ready
    ``predictor``. ``masks``: None (default) outlines objects with the detector's own masks when it has a mask
    head, else with their boxes; False: boxes only; True: masks or an error. With ``sam_checkpoint`` /
    ``sam_predictor``, SAM prompted with the merged boxes gives the masks (see :func:`segment_instances`).

    Settings come in groups (:mod:`densevision.apis.settings`: ``tiling``, ``reading``, ``compute``,
    ``detection``), or as keywords naming their fields: ``tile=1024, overlap=128, batch_size=2,
    score_threshold=0.3, merge="nmm", match="ios", match_threshold=0.5, class_agnostic=False, overview=False,
    masks=None, sam_checkpoint=None, coco_out=None, native_crs=False`` and the reading / compute ones of
    :func:`~densevision.apis.segment.segment_image`.

    Returns:
        The run summary (also written as JSON).
    """
    model = gather(model, Model(config, checkpoint), options)
    tiling = gather(tiling, DETECTION_TILING, options)
    reading = gather(reading, Reading(), options)
    compute = gather(compute, Compute(), options)
    task = DetectionTask(gather(detection, Detection(), options), predictor, sam_predictor)
    refuse_unknown(options, "detect_objects")
    return run_job(image, out, task, model=model, tiling=tiling, reading=reading, compute=compute, resume=resume)


class _SamWindows(TileDataset):
    """Item ``i``: ``(i, window i's pixels)``, read by the engine's reader workers as ``h x w x 3`` uint8 RGB (what SAM
    takes), invalid pixels black."""

    def __init__(self, job: Job, windows: Sequence[PromptWindow]) -> None:
        super().__init__(job.src.path, [], job.geometry, job.reading.open_options, job.value_scale)
        self.windows = list(windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:  # type: ignore[override]  # a window, not a tile
        window = self.windows[i]
        pixels, valid = self.read_window(window.x, window.y, window.w, window.h, window.size)
        pixels = self.value_scale(pixels) if self.value_scale is not None else pixels
        pixels = np.where(valid[..., None], pixels, 0)
        if pixels.shape[-1] < 3:
            pixels = np.repeat(pixels[..., :1], 3, axis=-1)
        return i, np.clip(pixels[..., :3], 0, 255).astype(np.uint8)


def _prompt_sam(job: Job, dets: Detections, sam: Any, outputs: _ObjectOutputs) -> int:
    """Prompt SAM once per merged object, in a window that contains it whole (a grid tile where one does, else a
    window around it read at a lower resolution); returns the number of windows. The windows are read by the reader
    workers and go to SAM ``batch_size`` at a time (its ``predict_windows``: one encoder pass per batch, where SAM
    has it; else one call per window)."""
    d = job.geometry.downsample
    windows = prompt_windows(dets.boxes, job.grid, d)
    if not windows:
        return 0
    predict = getattr(sam, "predict_windows", None) or (lambda ims, bxs: [sam(*a) for a in zip(ims, bxs, strict=True)])
    workers = min(job.reading.workers, len(windows))
    loader = window_loader(_SamWindows(job, windows), batch_size=job.tiling.batch_size, workers=workers)
    for batch in loader:
        chosen = [windows[i] for i, _ in batch]
        found = predict([pixels for _, pixels in batch], [w.local_boxes(dets.boxes, d) for w in chosen])
        for window, (masks, _) in zip(chosen, found, strict=True):
            for mask, k in zip(masks, window.indices.tolist(), strict=True):
                geom = mask_to_polygons(mask, offset=window.offset(d), scale=window.pixel(d))
                outputs.add(
                    dets.boxes[k],
                    dets.scores[k],
                    int(dets.labels[k]),
                    bool(dets.partial[k]),
                    len(dets.sources(k)),
                    geom,
                )
    return len(windows)


def segment_instances(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    sam_checkpoint: str | os.PathLike[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Instance masks over a whole image: the detector's boxes, merged across tiles, prompt SAM
    (``sam_checkpoint``: an official vit_b / vit_l / vit_h checkpoint) in a window that contains each whole object;
    each object's mask becomes one polygon feature with a global id. Without ``sam_checkpoint`` (or
    ``sam_predictor=``), the detector's own mask head is used and the pieces of an object cut by tile borders are
    united. Options as for :func:`detect_objects`."""
    return detect_objects(image, config, checkpoint, out=out, sam_checkpoint=sam_checkpoint, masks=True, **options)
