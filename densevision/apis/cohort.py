"""``run_cohort``: many slides or scenes in one run, the model built once, each image exactly once.

The flow: the inputs become a list of images with output names under the output folder
(:func:`~densevision.engine.cohort.collect_images`; under ``torchrun``, rank 0's list, shared through the store)
-> ``--shard I/N`` keeps its part -> images larger than ``split_above`` run first, one after the other, each split
across all ranks by tile rows as a single image is -> the others are claimed one at a time from the store's counter,
each run whole by the rank that drew it -> per image: skipped when its summary holds the same request
(:func:`~densevision.apis.job.request_fingerprint`) and its outputs are there; resumed from its work folder when
one is there; a failure recorded in ``<name>.failed.json`` with its one-line error while the cohort goes on ->
``cohort.csv`` / ``cohort.json`` rebuilt from the files after every image (so a re-run's report covers earlier runs
too), and a summary.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from densevision.apis.job import (
    Task,
    beside,
    polygons_beside,
    request_fingerprint,
    run_job,
    work_folder_path,
    working_size,
)
from densevision.apis.settings import (
    DETECTION_TILING,
    SEGMENTATION_TILING,
    Compute,
    Detection,
    Model,
    Reading,
    Segmentation,
    Tiling,
    gather,
    refuse_unknown,
)
from densevision.engine.cohort import (
    MANIFEST_SUFFIXES,
    ClaimFile,
    Claims,
    CohortImage,
    collect_images,
    parse_shard,
    rendezvous_store,
    shared_value,
)
from densevision.engine.distributed import init_distributed
from densevision.engine.reader import read_geometry
from densevision.engine.runner import resolve_device
from densevision.errors import DenseVisionError, DiskFullError, OutputError
from densevision.io import open_image
from densevision.io.atomic import remove_quietly, replacing, write_json

__all__ = ["MANIFEST_SUFFIXES", "SUFFIXES", "run_cohort"]
# The main output of each task; the other outputs go beside it (Job.beside).
SUFFIXES = {"segment": ".tif", "detect": ".geojson", "instances": ".geojson"}
# Images with more working pixels than this are split across the ranks of a torchrun, as a single image is.
SPLIT_ABOVE = 1 << 30
STATUSES = ("done", "failed", "changed", "running", "pending")
REPORT_COLUMNS = (
    "name", "input", "status", "error", "tiles_done", "tiles_skipped", "tiles_total", "seconds", "output", "summary",
)  # fmt: skip


class _Tasks:
    """Each image's task (its own outputs beside the image's), all sharing one model, built when first needed."""

    def __init__(self, kind: str, settings: Segmentation | Detection, predictor: Any, sam_predictor: Any) -> None:
        from densevision.apis.detect import DetectionTask
        from densevision.apis.segment import SegmentationTask

        self.type: type[Task] = SegmentationTask if kind == "segment" else DetectionTask
        self.settings, self.predictor, self.sam = settings, predictor, sam_predictor
        self.built = False

    def settings_for(self, out: Path) -> Any:
        """The image's own files beside its main output: COCO results, and polygons in the format asked for (the
        suffix of the path given, or a format alone: ``gpkg``)."""
        s = self.settings
        if isinstance(s, Detection) and s.coco_out is not None:
            return dataclasses.replace(s, coco_out=beside(out, ".coco.json"))
        if isinstance(s, Segmentation) and s.polygons is not None:
            return dataclasses.replace(s, polygons=polygons_beside(out, s.polygons))
        return s

    def _make(self, settings: Segmentation | Detection) -> Task:
        from densevision.apis.detect import DetectionTask
        from densevision.apis.segment import SegmentationTask

        if isinstance(settings, Segmentation):
            return SegmentationTask(settings, self.predictor)
        return DetectionTask(settings, self.predictor, self.sam)

    def build(self, model: Model, device: Any) -> None:
        """The model (and SAM), once; a config or checkpoint that does not load stops the cohort."""
        if not self.built:
            s = self.settings
            no_files = (
                dataclasses.replace(s, coco_out=None)
                if isinstance(s, Detection)
                else dataclasses.replace(s, polygons=None)
            )
            task = self._make(no_files)
            self.predictor = task.predictor(model, device)
            self.sam = getattr(task, "sam", None)
            self.built = True

    def __call__(self, out: Path) -> Task:
        return self._make(self.settings_for(out))


_JSON_CACHE: dict[Path, tuple[tuple[int, int], dict[str, Any] | None]] = {}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON file, or None when it is missing or unreadable (cached while its size and time are unchanged)."""
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _JSON_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        value: dict[str, Any] | None = dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        value = None
    _JSON_CACHE[path] = (stamp, value)
    return value


def _outputs_there(summary: dict[str, Any]) -> bool:
    paths = [summary.get(k) for k in ("output", "summary", "probabilities", "preview", "coco", "polygons")]
    return all(Path(p).exists() for p in paths if isinstance(p, str))


@dataclasses.dataclass
class _Entry:
    """An image of the cohort with its main output and the request it is run with."""

    image: CohortImage
    out: Path
    request: dict[str, Any]

    @property
    def summary_path(self) -> Path:
        return beside(self.out, ".summary.json")

    @property
    def failed_path(self) -> Path:
        return beside(self.out, ".failed.json")

    @property
    def claim(self) -> ClaimFile:
        return ClaimFile(self.out.with_name(self.out.name + ".claim"))

    def state(self) -> tuple[str, dict[str, Any] | None]:
        """``(status, its summary or failure record)``, as the files say: done (the same request's outputs are
        all there), changed (outputs or a work folder from another request), failed (the same request failed),
        running (claimed by a live process), pending."""
        summary = _read_json(self.summary_path)
        if summary is not None:
            if summary.get("request") != self.request:
                return "changed", summary
            if _outputs_there(summary):
                return "done", summary
        failed = _read_json(self.failed_path)
        if failed is not None and failed.get("request") == self.request:
            return "failed", failed
        if self.claim.held():
            return "running", None
        work = _read_json(work_folder_path(self.out) / "run.json")
        if work is not None and work.get("request") != self.request:
            return "changed", None
        return "pending", None


def _row(entry: _Entry, status: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """One line of the report."""
    row: dict[str, Any] = {
        "name": entry.image.name, "input": str(entry.image.path), "status": status, "error": None,
        "tiles_done": None, "tiles_skipped": None, "tiles_total": None, "seconds": None,
        "output": str(entry.out), "summary": None, "classes": {},
    }  # fmt: skip
    if status == "failed" and record:
        row.update(error=record.get("error"), seconds=record.get("seconds"))
    elif status == "changed":
        row["error"] = (
            "its outputs or work folder come from other settings or another input file; --overwrite redoes it"
        )
    elif status == "done" and record:
        tiles = record.get("tiles", {})
        row.update(
            tiles_done=tiles.get("done"), tiles_skipped=tiles.get("skipped"), tiles_total=tiles.get("total"),
            seconds=round(float(record.get("timings", {}).get("seconds_wall", 0.0)), 3), summary=record.get("summary"),
        )  # fmt: skip
        for c in record.get("classes", []):  # object counts, pixels, areas (um2 / m2 where the resolution is known)
            for k, v in c.items():
                if k in ("count", "pixels") or k.startswith("area_"):
                    row["classes"][f"{c['name']} {k}"] = v
    return row


class _Report:
    """The cohort report (``cohort.csv``, ``cohort.json``; ``cohort.shard-I-of-N.*`` for a shard), rebuilt from the
    files, each replaced atomically."""

    def __init__(self, out_dir: Path, entries: list[_Entry], settings: dict[str, Any], shard: tuple[int, int] | None):
        self.entries, self.settings = entries, settings
        stem = f"cohort.shard-{shard[0] + 1}-of-{shard[1]}" if shard else "cohort"
        self.csv, self.json = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
        self.out_dir = out_dir

    def write(self, seconds: float) -> dict[str, Any]:
        rows = [_row(e, *e.state()) for e in self.entries]
        totals: dict[str, float] = {}
        for r in rows:
            for k, v in r["classes"].items():
                totals[k] = totals.get(k, 0) + (v or 0)
        summary = {
            "out_dir": str(self.out_dir), "images": len(rows),
            "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "seconds_wall": round(seconds, 3), "totals": totals, "settings": self.settings,
            "report": {"csv": str(self.csv), "json": str(self.json)}, "rows": rows,
        }  # fmt: skip
        columns = list(REPORT_COLUMNS) + sorted({k for r in rows for k in r["classes"]})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: "" if v is None else v for k, v in r.items()}, **r["classes"]})
        with replacing(self.csv) as tmp:
            tmp.write_text(text.getvalue())
        write_json(self.json, summary)
        return summary


def _working_pixels(image: CohortImage, reading: Reading) -> int:
    """Working pixels of an image (0 when it cannot be opened: its failure is recorded when it is run)."""
    try:
        with open_image(image.path, **reading.open_options) as src:
            return int(
                np.prod(working_size(src, read_geometry(src, level=reading.level, mpp=reading.mpp), reading.mpp))
            )
    except DenseVisionError:
        return 0


def _reading_for(reading: Reading, image: CohortImage) -> Reading:
    """The cohort's reading settings with the image's own (a manifest's mpp replaces a level, and back)."""
    given = dict(image.reading)
    if "bands" in given:
        given["bands"] = tuple(given["bands"])
    if "mpp" in given:
        given.setdefault("level", None)
    if "level" in given:
        given.setdefault("mpp", None)
    return dataclasses.replace(reading, **given).check() if given else reading


def run_cohort(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    task: str = "segment",
    config: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    pattern: str | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
    shard: str | tuple[int, int] | None = None,
    split_above: int = SPLIT_ABOVE,
    predictor: Any = None,
    sam_predictor: Any = None,
    model: Model | None = None,
    tiling: Tiling | None = None,
    reading: Reading | None = None,
    compute: Compute | None = None,
    segmentation: Segmentation | None = None,
    detection: Detection | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``task`` (``"segment"``, ``"detect"`` or ``"instances"``) over every image that ``inputs`` name (image
    files, folders searched recursively for ``pattern``, manifests: see
    :func:`~densevision.engine.cohort.collect_images`), writing each image's outputs under ``out_dir`` by its
    name (``<name>.tif`` / ``<name>.geojson`` and the files beside them).

    The model is built once. An image whose outputs are complete for the same request is skipped; one with a work
    folder is resumed; one whose outputs came from other settings is redone only with ``overwrite``. An image that
    fails is recorded (``<name>.failed.json``, the report) and the rest go on, unless ``fail_fast``. ``shard``:
    ``"I/N"`` keeps every N-th image starting at the I-th (1-based). Under ``torchrun`` the ranks claim images
    from the rendezvous store; images of more than ``split_above`` working pixels are split across all ranks.
    Settings are as for :func:`~densevision.segment_image` / :func:`~densevision.detect_objects` (groups or flat
    keywords); manifest columns ``mpp`` / ``level`` / ``bands`` override ``reading`` per image. ``log`` receives a
    line per finished image.

    Returns:
        The cohort summary (also ``out_dir/cohort.json``; ``cohort.csv`` has one row per image): ``counts`` per
        status (done, failed, changed, running, pending), ``rows``, class ``totals``.

    Raises:
        ConfigError: bad inputs or settings (before any image is run); with ``fail_fast``, the first image's error.
    """
    if task not in SUFFIXES:
        raise ValueError(f"task must be one of {', '.join(SUFFIXES)}, got {task!r}")
    started = time.perf_counter()
    say = log or (lambda line: None)
    model = gather(model, Model(config, checkpoint), options)
    tiling = gather(tiling, SEGMENTATION_TILING if task == "segment" else DETECTION_TILING, options).check()
    reading = gather(reading, Reading(), options).check()
    compute = gather(compute, Compute(), options)
    settings: Segmentation | Detection
    if task == "segment":
        settings = gather(segmentation, Segmentation(), options).check()
    else:
        settings = gather(detection, Detection(), options)
        settings = dataclasses.replace(settings, masks=True).check() if task == "instances" else settings.check()
    refuse_unknown(options, "run_cohort")
    part = parse_shard(shard) if isinstance(shard, str) else shard
    out_root = Path(out_dir)
    if out_root.exists() and not out_root.is_dir():
        raise OutputError(f"{out_root}: is a file; a cohort writes into a folder (give -o a folder)")
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{out_root}: cannot create the output folder ({exc.strerror or exc}); choose another -o"
        ) from None
    device = resolve_device(compute.device)
    rank, world = init_distributed(device)
    tasks = _Tasks(task, settings, predictor, sam_predictor)
    given = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = "densevision/cohort/" + hashlib.sha1(f"{out_root.resolve()}|{part}|{restart}".encode()).hexdigest()

    def plan() -> list[dict[str, Any]]:
        images = collect_images(given, out_root, pattern=pattern)
        if part is not None:
            images = images[part[0] :: part[1]]
        return [
            {"path": str(im.path), "name": im.name, "reading": im.reading, "given": im.given,
             "split": world > 1 and _working_pixels(im, _reading_for(reading, im)) > split_above}
            for im in images
        ]  # fmt: skip

    planned = shared_value(world, rank, f"{key}/plan", plan)  # rank 0's view of the inputs, on every rank
    entries = []
    for p in planned:
        image = CohortImage(Path(p["path"]), p["name"], p["reading"], p["given"])
        out = out_root / (image.name + SUFFIXES[task])
        request = request_fingerprint(
            image.path, tasks.type, tasks.settings_for(out), model=model, tiling=tiling,
            reading=_reading_for(reading, image), compute=compute,
        )  # fmt: skip
        entries.append(_Entry(image, out, request))
    report = _Report(
        out_root, entries,
        {"task": task, "model": {"config": str(model.config), "checkpoint": str(model.checkpoint)},
         "tiling": dataclasses.asdict(tiling), "world_size": world, "shard": list(part) if part else None},
        part,
    )  # fmt: skip
    before = {e.image.name: e.state()[0] for e in entries} if rank == 0 else {}
    shown = dataclasses.replace(compute, progress=compute.progress and rank == 0)
    bar = tqdm(total=len(entries), unit="image", disable=not shown.progress, dynamic_ncols=True)
    tally = {"done": 0, "failed": 0, "skipped": 0}

    def decide(e: _Entry) -> str:
        """run, skipped (done before), changed (done with other settings, no --overwrite) or running (elsewhere)."""
        status = e.state()[0]
        if status == "done":
            return "skipped"
        if status == "changed" and not overwrite:
            return "changed"
        return "running" if status == "running" else "run"

    def process(e: _Entry, ranks: tuple[int, int], decision: str) -> None:
        if decision == "changed":
            tally["failed"] += 1
            say(f"changed {e.image.name}: its outputs come from other settings; --overwrite redoes it")
        if decision != "run":
            tally["skipped"] += decision == "skipped"
            return
        if overwrite and e.state()[0] == "changed":
            remove_quietly(work_folder_path(e.out))
        t0 = time.perf_counter()
        try:
            tasks.build(model, device)
            t0 = time.perf_counter()  # the model's build is the cohort's, not this image's
            summary = run_job(
                e.image.path, e.out, tasks(e.out), model=model, tiling=tiling,
                reading=_reading_for(reading, e.image), compute=shown, resume=True, ranks=ranks,
            )  # fmt: skip
        except Exception as exc:
            if not tasks.built:
                raise  # the model itself does not load: nothing can run
            internal = not isinstance(exc, DenseVisionError)
            if internal:
                traceback.print_exc(file=sys.stdout)  # into the log
            error = f"internal error: {type(exc).__name__}: {exc}" if internal else str(exc)
            if ranks[0] == 0:
                with contextlib.suppress(DenseVisionError, OSError):  # a full disk: the error raised below says so
                    write_json(
                        e.failed_path,
                        {"input": str(e.image.path), "error": error, "seconds": round(time.perf_counter() - t0, 3),
                         "request": e.request},
                    )  # fmt: skip
            tally["failed"] += 1
            if fail_fast or isinstance(exc, DiskFullError):  # on a full disk every image after it would fail too
                raise  # the caller's one line says it
            say(f"failed {e.image.name}: {error}")
            return
        if ranks[0] == 0:
            e.failed_path.unlink(missing_ok=True)
            tally["done"] += 1
            say(f"done {e.image.name}: {summary['tiles']['done']} tiles in {time.perf_counter() - t0:.1f} s")

    def finished(ran: bool) -> None:
        bar.update(1)
        bar.set_postfix(tally, refresh=False)
        if ran:
            report.write(time.perf_counter() - started)

    try:
        for i, e in enumerate(entries):  # large images first: every rank takes part, one image after the other
            if not planned[i]["split"]:
                continue
            claim = e.claim

            def decide_large(e: _Entry = e, claim: ClaimFile = claim) -> str:
                d = decide(e)
                return "running" if d == "run" and not claim.take() else d

            decision = shared_value(world, rank, f"{key}/decide/{i}", decide_large)
            try:
                process(e, (rank, world), decision)
            finally:
                if rank == 0 and decision == "run":
                    claim.release()
            finished(decision == "run")
        solo = [i for i, p in enumerate(planned) if not p["split"]]
        for j in Claims(len(solo), f"{key}/next", world):  # the rest: each rank draws the next image
            e = entries[solo[j]]
            decision, claim = decide(e), e.claim
            if decision == "run" and not claim.take():
                decision = "running"
            try:
                process(e, (0, 1), decision)
            finally:
                if decision == "run":
                    claim.release()
            finished(decision == "run")
    finally:
        bar.close()
    if world > 1:  # rank 0 reports once every rank is through (waiting on the store, not at a timed barrier)
        store = rendezvous_store()
        store.add(f"{key}/finished", 1)
        if rank != 0:  # stay until rank 0 has reported: a node whose agent leaves early can take the store with it
            store.wait([f"{key}/reported"])
            return {"rank": rank, "tally": tally}
        while int(store.add(f"{key}/finished", 0)) < world:
            time.sleep(0.2)
    try:
        result = report.write(time.perf_counter() - started)
    finally:
        if world > 1:
            store.set(f"{key}/reported", "1")
    result["already_done"] = sum(before.get(r["name"]) == "done" and r["status"] == "done" for r in result["rows"])
    return result
