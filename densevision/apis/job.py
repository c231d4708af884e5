"""One whole-image job that segmentation, detection and instance masks plug into: the shared steps, written once.

The flow, in one direction::

    output path checked -> device, ranks -> image opened -> working resolution -> the task's model
    -> tile grid, thumbnail, value scale, tiles with content -> work folder (rank 0 creates or checks it against
    the run's fingerprint, the other ranks join it) -> this rank's contiguous share of tile rows, predicted by the
    task's consumer in batches aligned to an uninterrupted run's -> rank 0: the task's finishing step, from the
    committed rows (in a process beside the prediction that follows the rows as they are committed, where the task
    allows it: :mod:`densevision.engine.finishing`) -> the run summary (the common parts here, the task's beside
    them)

A :class:`Task` adds only what is its own: the output it writes, its model, its fingerprint entries and work folder
layout, its consumer of predicted batches and its finishing step.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from densevision import __version__
from densevision.apis.settings import Compute, Model, Reading, Tiling
from densevision.engine.distributed import init_distributed, on_every_rank, split_contiguous
from densevision.engine.finishing import FinishingProcess, can_finish_alongside
from densevision.engine.reader import ReadGeometry, TileDataset, read_geometry
from densevision.engine.runner import RunStats, TileRunner, resolve_device
from densevision.engine.workdir import WorkFolder
from densevision.errors import ConfigError
from densevision.io import ImageSource, Thumbnail, open_image
from densevision.io.atomic import check_output_path, replacing, write_json
from densevision.io.raster import bounded_gdal_cache
from densevision.io.scaling import ValueScale
from densevision.tiling import TileGrid, tiles_with_content, tissue_mask

PREVIEW_SIZE = 1024


@dataclass(frozen=True)
class Job:
    """What the shared steps established about one image, for the task's steps."""

    src: ImageSource
    out: Path
    geometry: ReadGeometry
    grid: TileGrid
    keep: np.ndarray  # a bool per tile of the grid: predict it (False: no content, skipped)
    thumb: Thumbnail
    value_scale: ValueScale | None
    device: torch.device
    model: Model
    tiling: Tiling
    reading: Reading
    compute: Compute

    def beside(self, suffix: str) -> Path:
        return beside(self.out, suffix)


def beside(out: Path, suffix: str) -> Path:
    """An output beside the main one: ``out/name.tif`` -> ``out/name<suffix>``."""
    stem = out.with_suffix("")
    return stem.with_name(stem.name + suffix)


def polygons_beside(out: Path, given: str | os.PathLike[str]) -> Path:
    """``out/name.polygons.<format>`` for polygons asked for by a format (``gpkg``) or a path's suffix."""
    fmt = Path(given).suffix or "." + str(given).lstrip(".")
    return beside(out, f".polygons{fmt}")


class Task(abc.ABC):
    """One kind of whole-image prediction plugged into :func:`run_job`."""

    #: the summary's note when no tile has content
    empty_note: str
    #: the task's own settings (a frozen dataclass): part of the run's request
    settings: Any

    @abc.abstractmethod
    def check_output(self, out: Path) -> None:
        """Raise :class:`ConfigError` if ``out`` is not an output this task writes (before anything slow)."""

    @abc.abstractmethod
    def predictor(self, model: Model, device: torch.device) -> Any:
        """The tile predictor (built once; ``size_divisor``, ``class_names`` and ``palette`` are read from it)."""

    @abc.abstractmethod
    def fingerprint(self, job: Job) -> dict[str, Any]:
        """The task's settings that change its committed rows: a resume must find them unchanged."""

    @abc.abstractmethod
    def work_folder(self, job: Job, root: Path, fingerprint: dict[str, Any], resume: bool) -> WorkFolder:
        """The task's layout of the work folder, one committed file per tile row."""

    @abc.abstractmethod
    def predict(
        self, job: Job, work: WorkFolder, rows: tuple[int, int], dataset: TileDataset, runner: TileRunner
    ) -> RunStats | None:
        """Predict tile rows ``[a, b)`` not yet committed to ``work``, committing each as it is finished."""

    def finishes_alongside(self, job: Job) -> bool:
        """Whether :meth:`finish` may run in a forked process beside the prediction (it must not run a model there:
        no CUDA and no torch thread pool after fork). It then reads the rows as they are committed, and calls
        ``work.wait_until_complete()`` before its outputs go into place."""
        return False

    @abc.abstractmethod
    def finish(self, job: Job, work: WorkFolder) -> dict[str, Any]:
        """Write the outputs from the committed rows (each appearing only when complete) and return the summary's
        task parts: ``outputs``, ``model``, ``settings``, ``results`` and ``timings`` (dicts merged into the common
        ones)."""


def working_size(src: ImageSource, geometry: ReadGeometry, mpp: float | None) -> tuple[int, int]:
    """``(width, height)`` of the image at the working resolution."""
    if mpp is None:
        w, h = src.level_dimensions[geometry.level]
        return int(w), int(h)
    w, h = (max(1, round(s / geometry.downsample)) for s in src.size)
    return w, h


def value_scale_for(src: ImageSource, thumb: Thumbnail, value_range: tuple[float, float] | None) -> ValueScale | None:
    """How raw values map to 0..255: the given range, the thumbnail's percentiles for non-uint8, else none."""
    if value_range is not None:
        return ValueScale.uniform(*value_range, src.band_count)
    if src.dtype != np.uint8:
        return ValueScale.from_sample(thumb.pixels, thumb.valid)
    return None


def tiles_to_run(
    src: ImageSource, grid: TileGrid, thumb: Thumbnail, geometry: ReadGeometry, skip_empty: bool
) -> np.ndarray:
    """A bool per tile of ``grid``: run it. Empty tiles (glass on slides, nodata / alpha on rasters, judged on the
    thumbnail) are skipped when ``skip_empty``."""
    if not skip_empty:
        return np.ones(len(grid), dtype=bool)
    content = tissue_mask(thumb.pixels, thumb.valid) if src.backend == "openslide" else thumb.valid
    scale = (thumb.downsample[0] / geometry.downsample, thumb.downsample[1] / geometry.downsample)
    return tiles_with_content(grid, content, scale)


def area_per_pixel(src: ImageSource, downsample: float) -> tuple[float, str] | None:
    """Physical area of a pixel covering ``downsample`` level-0 pixels a side: um^2 for slides with a known mpp,
    m^2 for rasters in a metric CRS."""
    if src.mpp is not None:
        return src.mpp[0] * src.mpp[1] * downsample**2, "um2"
    if src.crs is not None and src.transform is not None and src.crs.linear_units in ("metre", "meter"):
        return abs(src.transform.determinant) * downsample**2, "m2"
    return None


def versions() -> dict[str, str]:
    return {"densevision": __version__, "torch": torch.__version__, "python": platform.python_version()}


def stretch_for_display(pixels: np.ndarray) -> np.ndarray:
    """``H x W x C`` values as ``H x W x 3`` float RGB 0..255 (1st-99th percentile stretch) for previews."""
    base = pixels[..., :3].astype(np.float32)
    if base.shape[-1] < 3:
        base = np.repeat(base[..., :1], 3, axis=-1)
    lo, hi = float(np.nanpercentile(base, 1)), float(np.nanpercentile(base, 99))
    return np.clip((np.nan_to_num(base, nan=lo) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)


def save_preview(path: Path, image: Image.Image) -> None:
    """A preview PNG, renamed into place when complete. Compression level 1: 2 % larger than level 6, 0.19 s
    instead of 0.31 s at 1024 px (a scene's thumbnail)."""
    with replacing(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)


def _path_or_none(p: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(p) if p is not None else None


def _file_stamp(path: str | os.PathLike[str] | None) -> Any:
    """A file as its resolved path, size and modification time (a name that is no file: as given)."""
    if path is None or not Path(path).is_file():
        return _path_or_none(path)
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "modified_ns": st.st_mtime_ns}


def request_fingerprint(
    image: str | os.PathLike[str],
    task: type[Task],
    settings: Any,
    *,
    model: Model,
    tiling: Tiling,
    reading: Reading,
    compute: Compute,
) -> dict[str, Any]:
    """What a run is asked to do, known before the image is opened: the input file, the model files, every setting
    that changes the outputs. The summary and the work folder keep it: a cohort skips an image whose summary holds
    the same, and a resume must find the same."""
    request = {
        "task": task.__name__, "input": _file_stamp(image), "config": _file_stamp(model.config),
        "checkpoint": _file_stamp(model.checkpoint), "cfg_options": model.cfg_options,
        "tiling": dataclasses.asdict(tiling),
        "reading": {k: v for k, v in dataclasses.asdict(reading).items() if k != "workers"},
        "amp": compute.amp, **({"compile": True} if compute.compile else {}), "settings": dataclasses.asdict(settings),
    }  # fmt: skip
    return json.loads(json.dumps(request, default=str))  # as the JSON files hold it (tuples as lists, paths as text)


def check_bands(src: ImageSource, in_channels: int | None) -> None:
    """The bands fed must be the model's input channels: a 4-band raster for a 3-channel model, or one band that
    would be silently broadcast, is refused before any tile is read."""
    if in_channels is None or src.band_count == in_channels:
        return
    if src.band_count == 1:
        fix = f"give --bands {' '.join(['1'] * in_channels)} to repeat its one band"
    else:
        first = " ".join(map(str, range(1, in_channels + 1)))
        fix = f"choose {in_channels} of its bands with --bands (e.g. --bands {first})"
    raise ConfigError(
        f"{src.path}: {src.band_count} band(s) would be fed to a model that takes {in_channels} channels; {fix}"
    )


def work_folder_path(out: Path) -> Path:
    """Where a run on ``out`` keeps its committed rows until it is finished."""
    return out.with_name(out.name + ".partial.d")


def run_job(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    task: Task,
    *,
    model: Model,
    tiling: Tiling,
    reading: Reading,
    compute: Compute,
    resume: bool = False,
    ranks: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``task`` over a whole image (see the module doc); returns the run summary, also written beside ``out``
    as ``*.summary.json``. Under ``torchrun`` every rank calls this; ranks other than 0 return only their share.
    ``ranks`` (``(rank, world_size)``) overrides the process group's: ``(0, 1)`` runs the image on this process
    alone (a cohort's ranks each take whole images)."""
    started = time.perf_counter()
    tiling, reading = tiling.check(), reading.check()
    out_path = check_output_path(out)
    task.check_output(out_path)
    device = resolve_device(compute.device)
    rank, world = ranks or init_distributed(device)
    request = request_fingerprint(
        image, type(task), task.settings, model=model, tiling=tiling, reading=reading, compute=compute
    )

    # The input is checked before the (slow) model build, so a wrong path fails at once.
    with open_image(image, **reading.open_options) as src, bounded_gdal_cache():
        geometry = read_geometry(src, level=reading.level, mpp=reading.mpp)
        predictor = task.predictor(model, device)
        check_bands(src, getattr(predictor, "in_channels", None))
        width, height = working_size(src, geometry, reading.mpp)
        grid = TileGrid(width, height, tiling.tile, tiling.overlap, divisor=predictor.size_divisor)
        thumb = src.thumbnail(PREVIEW_SIZE)
        value_scale = value_scale_for(src, thumb, reading.value_range)
        keep = tiles_to_run(src, grid, thumb, geometry, reading.skip_empty)
        job = Job(src, out_path, geometry, grid, keep, thumb, value_scale, device, model, tiling, reading, compute)
        names = list(predictor.class_names)
        fingerprint = {
            "input": str(Path(src.path).resolve()), "input_size": list(src.size), "output_size": [width, height],
            "config": _path_or_none(model.config), "checkpoint": _path_or_none(model.checkpoint), "classes": names,
            "tile": tiling.tile, "overlap": tiling.overlap, "batch_size": tiling.batch_size, "level": geometry.level,
            "mpp": reading.mpp, "bands": list(reading.bands) if reading.bands else None,
            "skip_empty": reading.skip_empty,
            "value_scale": [value_scale.lo, value_scale.hi] if value_scale else None,
            "request": request, **task.fingerprint(job),
        }  # fmt: skip
        root = work_folder_path(out_path)
        # Rank 0 creates (or checks) the work folder; the others join it once it is there. A step that fails on one
        # rank fails on all (on_every_rank), so that no rank waits for it.
        work = on_every_rank(world, lambda: task.work_folder(job, root, fingerprint, resume) if rank == 0 else None)
        work = work or task.work_folder(job, root, fingerprint, True)
        rows_before = work.done()
        kept_per_row = np.bincount([t.row for t in grid if keep[t.index]], minlength=len(grid.ys))
        share = split_contiguous(kept_per_row, world)[rank]
        runner = TileRunner(
            batch_size=tiling.batch_size, workers=reading.workers, device=device, amp=compute.amp,
            compile=compute.compile,
            progress=compute.progress and rank == 0,
        )  # fmt: skip
        dataset = TileDataset(src.path, [], geometry, reading.open_options, value_scale)
        # Rank 0 writes the outputs beside the prediction, following the committed rows (where it can: fork).
        alongside = rank == 0 and task.finishes_alongside(job) and can_finish_alongside()
        finishing = FinishingProcess(lambda follow: task.finish(job, work.following(follow))) if alongside else None
        try:
            stats = on_every_rank(world, lambda: task.predict(job, work, share, dataset, runner))
            if rank != 0:
                return {"rank": rank, "rows": list(share), "timings": stats.as_dict() if stats else {}}
            work.wait_until_complete()
            predicted = time.perf_counter()
            parts = finishing.result() if finishing is not None else task.finish(job, work)
            finishing_seconds = time.perf_counter() - predicted
        finally:
            if finishing is not None:
                finishing.stop()
        source_facts = src.describe()

    summary: dict[str, Any] = {
        "input": source_facts,
        "output": str(out_path),
        **parts["outputs"],
        "model": {
            "config": _path_or_none(model.config), "checkpoint": _path_or_none(model.checkpoint), "classes": names,
            **parts["model"],
        },
        "settings": {
            "tile": tiling.tile, "overlap": tiling.overlap, "batch_size": tiling.batch_size, "level": geometry.level,
            "mpp": reading.mpp, "downsample": geometry.downsample, "device": str(device), "amp": compute.amp,
            "compile": compute.compile,
            "workers": reading.workers, "world_size": world, "skip_empty": reading.skip_empty,
            "value_scale": {"lo": list(value_scale.lo), "hi": list(value_scale.hi)} if value_scale else None,
            **parts["settings"],
        },
        "output_size": [width, height],
        "tiles": {"total": len(grid), "done": int(keep.sum()), "skipped": int((~keep).sum())},
        "resumed": {"rows_already_done": rows_before, "rows": work.rows} if resume else None,
        "request": request,
        **parts["results"],
        "timings": {
            **(stats.as_dict() if stats else {}), **parts["timings"],
            # After the last row: the outputs' rest (written beside the prediction: what it had left to do).
            "seconds_finishing": finishing_seconds, "finished_alongside": finishing is not None,
            "seconds_wall": time.perf_counter() - started,
        },
        "versions": versions(),
    }  # fmt: skip
    if not keep.any():
        summary["note"] = task.empty_note
    summary_path = job.beside(".summary.json")
    summary["summary"] = str(summary_path)
    write_json(summary_path, summary)
    work.remove()  # after the summary: a disk that fills at the summary leaves the work to resume from
    return summary
