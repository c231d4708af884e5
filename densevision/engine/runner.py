"""The streaming loop: batches of tiles from reader workers through a predictor into a consumer (a stitcher),
with the consumer's writing done on a background thread so the model does not wait on compression and disk."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from densevision.engine.heap import HeapWatch, bound_heap_growth
from densevision.engine.reader import TileDataset, tile_loader
from densevision.tiling.grid import Tile

# (tile indexes, the predictor's output for the batch, valid B x T x T on the host) -> None. Segmentation
# predictors give logits B x K x T x T: handed on as a float32 tensor on the predictor's device, not copied back
# (the stitcher blends there; only finished, reduced blocks cross to the host). Detection predictors give one
# TileDetections per tile, handed on as they are.
BatchConsumer = Callable[[list[int], Any, np.ndarray], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun each rank takes its own GPU.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(device)


def batch_aligned(order: Sequence[Tile], rows: tuple[int, int], batch_size: int) -> list[Tile]:
    """The tiles to predict for tile rows ``[a, b)``: those of ``order`` (the tiles an uninterrupted run predicts,
    in its order) from the first in row ``a`` or later to the last in a row before ``b``, widened to the batches
    of ``batch_size`` that the uninterrupted run would form. Every tile is then predicted in the same company as in
    that run (batched kernels may round differently with other batch neighbours): resumed runs and ranks give the
    same bits. The caller ignores the widened tiles' predictions."""
    a, b = rows
    lo = next((i for i, t in enumerate(order) if t.row >= a), len(order))
    hi = max((i + 1 for i, t in enumerate(order) if t.row < b), default=0)
    return list(order[lo - lo % batch_size : min(len(order), -(-hi // batch_size) * batch_size)])


RELEASE_SECONDS = 1.0  # how often the loop looks whether to give freed heap pages back (see HeapWatch)


@dataclass
class RunStats:
    tiles: int = 0
    batches: int = 0
    seconds_waiting_for_tiles: float = 0.0
    seconds_predicting: float = 0.0
    seconds_consuming: float = 0.0
    seconds_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tiles_per_second"] = self.tiles / self.seconds_total if self.seconds_total else None
        return d


class BackgroundCalls:
    """Runs calls in order on one thread; the first error is raised by ``close`` (or by the next ``submit``).

    ``submit`` waits while the calls queued (not yet finished) weigh ``depth`` or more in all (each its ``weight``,
    e.g. the pixels it holds); a call is always admitted to an empty queue."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], int] | None] = queue.SimpleQueue()
        self._depth, self._queued = depth, 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="densevision-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, weight = item
            if self._error is None:
                try:
                    fn(*args)
                except BaseException as e:
                    self._error = e
            with self._room:
                self._queued -= weight
                self._room.notify()

    def submit(self, fn: Callable[..., Any], *args: Any, weight: int = 1) -> None:
        with self._room:
            self._room.wait_for(lambda: self._queued == 0 or self._queued + weight <= self._depth)
            self._queued += weight
        if self._error is not None:
            raise self._error
        self._queue.put((fn, args, weight))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


@dataclass
class TileRunner:
    """Streams ``dataset`` through ``predict`` in batches of ``batch_size`` and hands results to a consumer."""

    batch_size: int = 4
    workers: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile the predictor

    def run(self, dataset: TileDataset, predict: Callable[[torch.Tensor], Any], consume: BatchConsumer) -> RunStats:
        """Feed every tile of ``dataset`` to ``predict`` and its output to ``consume``, batch by batch.

        Tiles arrive from the reader workers in their source dtype (uint8 for slides and 8-bit rasters; see
        :class:`TileDataset`), pinned when the device is CUDA; each batch is moved to the device (non-blocking when
        pinned) and converted to float32 there, so ``predict`` gets ``B x C x T x T`` float32 raw values as before,
        under ``torch.inference_mode`` (its outputs are only read downstream). On CUDA nothing here waits for the
        device: ``seconds_predicting`` is the time to queue the model's work, and the consumer's first wait (a
        finished block's copy back) counts in ``seconds_consuming``."""
        bound_heap_growth()
        if self.compile:
            predict = torch.compile(predict, dynamic=False)
        stats = RunStats()
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        floats: torch.Tensor | None = None
        loader = tile_loader(
            dataset, batch_size=self.batch_size, workers=min(self.workers, len(dataset)), pin_memory=cuda
        )
        bar = tqdm(total=len(dataset), unit="tile", disable=not self.progress, dynamic_ncols=True, leave=None)
        try:
            heap, waited = HeapWatch(), time.perf_counter()
            released = waited
            for tiles in loader:
                t0 = time.perf_counter()
                stats.seconds_waiting_for_tiles += t0 - waited
                if cuda:
                    # Each pinned piece to the device, non-blocking, joined and converted there: exact for uint8.
                    pieces = [p.to(self.device, non_blocking=True) for p in tiles.pieces]
                    batch = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).float()
                else:
                    # On the CPU into a float32 buffer reused batch to batch (4 x 3 x 512² uint8: 1.7 ms, a new
                    # tensor 6.7 ms, its page faults); each batch's output is consumed before the next overwrites it,
                    # and the pieces (the readers' reused memory) are copied out before the next batch is taken.
                    # numpy copies on this thread alone: a parallel torch copy waits for a core the readers hold
                    # (up to a scheduler time slice, 16 ms, measured on 2 cores).
                    shape = (len(tiles), *tiles.pieces[0].shape[1:])
                    if floats is None or floats.shape[1:] != shape[1:] or len(floats) < len(tiles):
                        floats = torch.empty(shape, dtype=torch.float32)
                    batch, at = floats[: len(tiles)], 0
                    for piece in tiles.pieces:
                        np.copyto(batch[at : at + len(piece)].numpy(), piece.numpy())
                        at += len(piece)
                with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    result = predict(batch)
                out = result.float() if isinstance(result, torch.Tensor) else result
                t1 = time.perf_counter()
                stats.seconds_predicting += t1 - t0
                consume(tiles.index, out, tiles.valid)
                waited = time.perf_counter()
                stats.seconds_consuming += waited - t1
                stats.tiles += len(tiles)
                stats.batches += 1
                bar.update(len(tiles))
                if waited > released + RELEASE_SECONDS:  # see densevision.engine.heap
                    heap.check()
                    released = waited
        finally:
            bar.close()
        stats.seconds_total = time.perf_counter() - start
        return stats
