"""``segment_image``: a whole slide or scene through a segmentation model, stitched into one class map.

The segmentation task of :func:`~densevision.apis.job.run_job`. Its consumer: tiles in :func:`stitch_order` feed the
:class:`~densevision.stitch.SegmentationStitcher`, whose final cells, reduced to class indices (and probabilities),
are regrouped into the grid's blocks and appended to their block row's file in the work folder. Its finishing step:
the committed blocks streamed into the class map (COG for rasters, pyramidal TIFF for slides), the probabilities,
the class counts and the preview.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from densevision.apis.job import PREVIEW_SIZE, Job, Task, area_per_pixel, run_job, stretch_for_display
from densevision.apis.settings import (
    SEGMENTATION_TILING,
    Compute,
    Model,
    Reading,
    Segmentation,
    Tiling,
    gather,
    refuse_unknown,
)
from densevision.compat import trusted_checkpoints
from densevision.engine.reader import TileDataset
from densevision.engine.runner import BackgroundCalls, RunStats, TileRunner, batch_aligned
from densevision.engine.workdir import BlockFolder, WorkFolder
from densevision.errors import ConfigError
from densevision.io import GeoTiffWriter, PyramidTiffWriter, Thumbnail, scale_transform
from densevision.io.atomic import replacing
from densevision.predictors.base import SegmentationPredictor
from densevision.stitch import SegmentationStitcher, class_map, probabilities
from densevision.stitch.segmentation import BlockAssembler, block_edges, stitch_order
from densevision.tiling.grid import axis_bounds

NODATA = 255
# Classes the preview leaves unpainted, so that the input shows through where nothing was found.
UNPAINTED = frozenset({"background", "_background_", "unlabeled", "unlabelled"})
# Blocks go to the writers in column strips of this many pixels, top to bottom within each strip: the writers' partial
# tiles then span a strip, not the image's width. A multiple of every tile size they use (512: 2**4 of them).
ASSEMBLY_STRIP = 8192


class _Outputs:
    """Finished blocks to the outputs: class map (and probabilities) to their writers, class pixel counts, and a
    nearest-neighbour preview of at most PREVIEW_SIZE pixels, one block at a time."""

    def __init__(
        self, classes: GeoTiffWriter | PyramidTiffWriter, probs: GeoTiffWriter | None, k: int, width: int, height: int
    ) -> None:
        self.classes, self.probs, self.k = classes, probs, k
        self.counts = np.zeros(k + 1, dtype=np.int64)  # last bin: nodata
        self.step = max(1, math.ceil(max(width, height) / PREVIEW_SIZE))
        self.preview = np.full((math.ceil(height / self.step), math.ceil(width / self.step)), NODATA, np.uint8)

    def __call__(self, y0: int, x0: int, cmap: np.ndarray, probs: np.ndarray | None) -> None:
        self.classes.write(cmap, x0, y0)
        if self.probs is not None and probs is not None:
            self.probs.write(probs, x0, y0)
        self.counts += np.bincount(np.minimum(cmap, self.k).ravel(), minlength=self.k + 1)
        # The preview keeps the pixels on a grid of `step`: this block's first ones are at offsets (-y0, -x0) % step.
        r, c = -y0 % self.step, -x0 % self.step
        on_grid = cmap[r :: self.step, c :: self.step]
        i, j = (y0 + r) // self.step, (x0 + c) // self.step
        self.preview[i : i + on_grid.shape[0], j : j + on_grid.shape[1]] = on_grid


def _write_preview(
    path: Path, thumb: Thumbnail, preview: np.ndarray, palette: tuple[tuple[int, int, int], ...], names: list[str]
) -> None:
    base = stretch_for_display(thumb.pixels)
    size = (base.shape[1], base.shape[0])
    classes = np.asarray(Image.fromarray(preview).resize(size, Image.Resampling.NEAREST))
    colours = np.array([*palette, (0, 0, 0)] + [(0, 0, 0)] * (256 - len(palette) - 1), dtype=np.float32)
    painted = np.ones(256, bool)
    painted[NODATA] = False
    painted[[i for i, name in enumerate(names) if name.lower() in UNPAINTED]] = False
    overlay = np.where(painted[classes][..., None], 0.55 * base + 0.45 * colours[classes], base)
    with replacing(path) as tmp:
        Image.fromarray(overlay.astype(np.uint8)).save(tmp, format="PNG")


class SegmentationTask(Task):
    """Class map (and probabilities) of a whole image; see the module doc."""

    empty_note = "no tile has content (all glass or nodata): the output is all nodata"

    def __init__(self, settings: Segmentation, predictor: SegmentationPredictor | None = None) -> None:
        self.settings = settings.check()
        self._predictor = predictor

    def check_output(self, out: Path) -> None:
        if out.suffix.lower() not in (".tif", ".tiff"):
            raise ConfigError(f"{out}: the segmentation output is a TIFF; name it *.tif")

    def predictor(self, model: Model, device: torch.device) -> SegmentationPredictor:
        if self._predictor is None:
            from densevision.predictors.mmseg import MMSegPredictor

            if model.config is None:
                raise ConfigError("segment_image needs a model: pass a config (-c) or a predictor")
            with trusted_checkpoints(model.trust_checkpoint):
                self._predictor = MMSegPredictor.from_config(
                    model.config, model.checkpoint, device=device, cfg_options=model.cfg_options
                )
        return self._predictor

    def fingerprint(self, job: Job) -> dict[str, Any]:
        return {"blend": self.settings.blend, "probabilities": self.settings.probability_output}

    def work_folder(self, job: Job, root: Path, fingerprint: dict[str, Any], resume: bool) -> BlockFolder:
        rows, cols = block_edges(job.grid, self.settings.blend)
        return BlockFolder(root, fingerprint, resume=resume, rows=rows, cols=cols)

    def predict(
        self, job: Job, work: WorkFolder, rows: tuple[int, int], dataset: TileDataset, runner: TileRunner
    ) -> RunStats | None:
        """Predict and stitch block rows ``[a, b)`` that are not yet in ``work``, committing each as it finishes.

        Tiles go in :func:`stitch_order`; the stitcher's cells, reduced to class indices (and probabilities), are
        regrouped into the grid's blocks (:func:`block_edges`) and appended to their row's file as each is final, so
        nothing as wide as the image is held. Starting at block row ``k`` (resuming, or a rank's share) redoes the
        tile rows whose windows reach into it; other rows count as skipped and their incomplete blocks are dropped.
        """
        assert isinstance(work, BlockFolder)
        grid, keep, blend = job.grid, job.keep, self.settings.blend
        with_probs = self.settings.probability_output
        predictor = self.predictor(job.model, job.device)
        tiles, order = list(grid), stitch_order(grid)
        position = {t.index: i for i, t in enumerate(order)}
        first, end = rows[0] + work.done(rows[0]), rows[1]
        if first >= end:
            return None
        edges = work.row_edges
        # The first tile row that reaches into block row `first` (its window; under crop its owned rows).
        reach = (
            axis_bounds(grid.ys, grid.tile, grid.height) if blend == "crop" else [(y, y + grid.tile) for y in grid.ys]
        )
        r0 = min(r for r, (_, y1) in enumerate(reach) if y1 > edges[first])
        background = BackgroundCalls()
        assembler = BlockAssembler(edges, work.col_edges, work.put, block_rows=(first, end))

        def block(y0: int, x0: int, logits: np.ndarray, valid: np.ndarray) -> None:
            if y0 >= edges[end] or y0 + valid.shape[0] <= edges[first]:
                return  # a block row this call does not commit
            if with_probs:
                assembler(y0, x0, class_map(logits, valid, NODATA), np.moveaxis(probabilities(logits, valid), 0, -1))
            else:
                assembler(y0, x0, class_map(logits, valid, NODATA))

        stitcher = SegmentationStitcher(
            grid, predictor.num_classes, blend, lambda y0, x0, lg, v: background.submit(block, y0, x0, lg, v)
        )
        needed = range(r0, end)  # block row k is final once tile rows up to k are in
        added = [bool(keep[t.index]) and t.row in needed for t in tiles]
        # Tiles of rows >= r0 are a suffix of the order (an interleaved pair of rows is never split by r0: its first
        # row reaches into the second's block row); rows < end a prefix, up to tiles of row `end` interleaved with
        # row end - 1, which are predicted to keep the batches aligned, but not added.
        dataset.tiles = batch_aligned([t for t in order if keep[t.index]], (r0, end), runner.batch_size)
        skipped_to = 0  # tiles before this position of the order that are not added have been skipped

        def skip_until(i: int) -> None:
            """Skip the tiles before position ``i`` of the order that are not added, in order with the added ones
            (skipping them all up front would complete cells far below, which the assembler would have to hold)."""
            nonlocal skipped_to
            for t in order[skipped_to:i]:
                if not added[t.index]:
                    stitcher.skip(t)
            skipped_to = max(skipped_to, i)

        def consume(indexes: list[int], logits: np.ndarray, valid: np.ndarray) -> None:
            for j, i in enumerate(indexes):
                if added[i]:  # the others were only computed to keep the batches aligned
                    skip_until(position[i])
                    stitcher.add(tiles[i], logits[j], valid[j])

        try:
            stats = runner.run(dataset, predictor, consume) if len(dataset) else None
            skip_until(len(order))
            stitcher.finish()
        finally:
            background.close()
            work.close()
        assembler.finish()
        return stats

    def finish(self, job: Job, work: WorkFolder) -> dict[str, Any]:
        """Stream the committed blocks into the final files (renamed into place only when complete), column strip by
        column strip (see ASSEMBLY_STRIP); blocks across a strip's edge are read once per strip and cut there."""
        assert isinstance(work, BlockFolder)
        src, d, grid = job.src, job.geometry.downsample, job.grid
        predictor = self.predictor(job.model, job.device)
        k, names = predictor.num_classes, list(predictor.class_names)
        width, height = grid.width, grid.height
        transform = scale_transform(src.transform, d) if src.transform else None
        if src.backend == "rasterio":
            classes: GeoTiffWriter | PyramidTiffWriter = GeoTiffWriter(
                job.out, width, height, 1, np.uint8, crs=src.crs, transform=transform, nodata=NODATA,
                colormap={i: (*c, 255) for i, c in enumerate(predictor.palette)}, class_names=names, cog=True,
            )  # fmt: skip
        else:
            mpp = (src.mpp[0] * d, src.mpp[1] * d) if src.mpp else None
            classes = PyramidTiffWriter(job.out, width, height, mpp=mpp, description=json.dumps(names))
        probs = None
        if self.settings.probability_output:
            probs = GeoTiffWriter(
                job.beside(".probs.tif"), width, height, k, np.float32,
                crs=src.crs if src.backend == "rasterio" else None, transform=transform, nodata=float("nan"),
                band_descriptions=names,
            )  # fmt: skip
        outputs = _Outputs(classes, probs, k, width, height)
        cols = work.col_edges
        with contextlib.ExitStack() as writers:  # each writer renamed into place on success, dropped on error
            writers.enter_context(classes)
            if probs is not None:
                writers.enter_context(probs)
            for x0 in range(0, width, ASSEMBLY_STRIP):
                x1 = min(x0 + ASSEMBLY_STRIP, width)
                span = (bisect.bisect_right(cols, x0) - 1, bisect.bisect_left(cols, x1))
                for by, bx, cmap, p in work.blocks(span):
                    a, b = max(x0, bx) - bx, min(x1, bx + cmap.shape[1]) - bx
                    outputs(by, bx + a, cmap[:, a:b], None if p is None else p[:, a:b])
        preview_path = job.beside(".preview.png")
        _write_preview(preview_path, job.thumb, outputs.preview, predictor.palette, names)
        area = area_per_pixel(src, d)
        counts = outputs.counts
        return {
            "outputs": {"probabilities": str(probs.path) if probs else None, "preview": str(preview_path)},
            "model": {},
            "settings": {"blend": self.settings.blend},
            "results": {
                "classes": [
                    {
                        "index": i,
                        "name": names[i],
                        "pixels": int(counts[i]),
                        **({f"area_{area[1]}": float(counts[i] * area[0])} if area else {}),
                    }
                    for i in range(k)
                ],
                "nodata_pixels": int(counts[k]),
            },
            "timings": {},
        }


def segment_image(
    image: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    predictor: SegmentationPredictor | None = None,
    model: Model | None = None,
    tiling: Tiling | None = None,
    reading: Reading | None = None,
    compute: Compute | None = None,
    segmentation: Segmentation | None = None,
    resume: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Segment a whole image tile by tile and write the stitched class map.

    Rasters get a COG with the input's CRS and transform (scaled to the working resolution); slides and plain
    images get a pyramidal TIFF with the resolution in microns. Beside ``out``: ``*.summary.json`` (inputs,
    tiles done / skipped, timings, class areas), ``*.preview.png`` (overlay), and with ``probability_output``
    ``*.probs.tif`` (float32 per class). Give ``config`` (a path or a shipped config's name) + ``checkpoint`` for an
    mmsegmentation model, or a ready ``predictor``. Pixels that are not uint8 are stretched to 0..255
    (``value_range``, or per-band 2nd-98th percentiles of the thumbnail; see :mod:`densevision.io.scaling`).

    Settings come in groups (:mod:`densevision.apis.settings`: ``tiling``, ``reading``, ``compute``,
    ``segmentation``), or as keywords naming their fields: ``tile=512, overlap=64, batch_size=4, blend="gaussian",
    level=None, mpp=None, bands=None, value_range=None, skip_empty=True, workers=2, device="auto", amp=False,
    progress=True, probability_output=False, cfg_options=None, trust_checkpoint=False``.

    Finished block rows are committed to ``<out>.partial.d/`` as the run goes; after a crash, ``resume=True`` redoes
    only what was not finished and gives the same bytes as an uninterrupted run.

    Returns:
        The run summary (also written as JSON).
    """
    model = gather(model, Model(config, checkpoint), options)
    tiling = gather(tiling, SEGMENTATION_TILING, options)
    reading = gather(reading, Reading(), options)
    compute = gather(compute, Compute(), options)
    task = SegmentationTask(gather(segmentation, Segmentation(), options), predictor)
    refuse_unknown(options, "segment_image")
    return run_job(image, out, task, model=model, tiling=tiling, reading=reading, compute=compute, resume=resume)
