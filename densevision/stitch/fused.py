"""The CPU stitcher's passes over a tile's logits: a cell's last step in one pass (the last tile's blend, the
normalisation and the class map, and for probabilities the normalised logits), and the contributions before it
into the cell's sums (:func:`add_contribution`, the reference's product and sum).

The stitcher's reference path (:class:`~densevision.stitch.segmentation.SegmentationStitcher` with a logits sink)
writes each contribution into the cell's ``C x h x w`` accumulator (``acc += logits * w``), divides it by the weight
sum, then reduces it to class indices: four or more passes over ``C x h x w`` float32, which on the CPU are memory
traffic (150 classes: 120 MB per 448² cell, several times over). The class map (and the normalised logits) of
the last contribution need none of them: per pixel

    v_k = (acc_k + logits_k * w) / (wsum + w)        class = first k maximising v_k

with the same float32 roundings in the same order (a product, a sum, a quotient; no fused multiply-add: numba does
not contract without ``fastmath``), so the class map is bit-identical to the reference's. A cell with one
contributor (most of the image under a smooth blend with a small overlap, all of it under ``crop``) never gets an
accumulator at all: ``v_k = (logits_k * w) / w``. Where the total weight is 0 the class is ``nodata``; a product
under weight 0 is +0 (NaN or garbage under padding must not leak). One flag rides along: whether every ``v_k`` is
finite, the reference's check that logits were finite where a tile had weight. For probabilities the pass also
writes the ``v_k`` out, less their maximum (exact in float32, as the reference's subtraction), band by band while they
are in the cache; the ``exp`` stays torch's (the reference's bits; libm's scalar ``exp`` per pixel was slower) and
:func:`normalise` sums and divides in the reference's order.

Layout: pixels are visited in bands of rows, classes in order within each band, so each class plane is read in
contiguous runs and the running maximum stays in the L1 cache (a band of ``8 x w`` floats and indices); the inner
loop over a row vectorises (numba's ``error_model="numpy"``: division by zero follows IEEE instead of raising).
Each row's run of the next class plane is prefetched while this one is read: a cell 64 pixels wide reads 256 bytes
of every 2 KB row of a 512² tile, which the hardware's prefetcher does not follow (150 classes, 384 x 64: 15 ms
without, 7 with). Without the GIL, over a band of the cell's rows: large cells are shared between threads
(:mod:`densevision.stitch.rows`).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_BAND = 8  # rows per band: 8 x 512 float32 running maxima and int32 indices fit the L1 cache with their inputs
_LINE = 64  # bytes per cache line


@intrinsic
def _prefetch(typingctx, address):
    """Ask the CPU to bring the cache line at ``address`` (an integer) in: LLVM's ``prefetch`` (read, all levels)."""

    def codegen(context, builder, signature, args):
        i32, ptr = ir.IntType(32), ir.PointerType()
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [ptr], ir.FunctionType(ir.VoidType(), [ptr, i32, i32, i32])
        )
        builder.call(fn, [builder.inttoptr(args[0], ptr), *(ir.Constant(i32, v) for v in (0, 3, 1))])
        return context.get_dummy_value()

    return types.void(types.intp), codegen


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _prefetch_row(a: np.ndarray, k: int, r: int, x0: int, w: int) -> None:
    """Prefetch ``a[k, r, x0 : x0 + w]`` (float32, C-contiguous): a short run of a plane, which the hardware's own
    prefetcher does not see coming (a 64-wide strip of a 512-wide tile: 256 bytes every 2 KB)."""
    start = a.ctypes.data + ((k * a.shape[1] + r) * a.shape[2] + x0) * 4
    for line in range(0, w * 4, _LINE):
        _prefetch(start + line)  # type: ignore[call-arg]


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")
def _keep(v: float, x: int, k: int, best: np.ndarray, index: np.ndarray, bad: np.ndarray) -> None:
    """Class ``k``'s value ``v`` at column ``x`` of a band row: it wins only when strictly greater (first maximum)."""
    b = best[x]
    wins = v > b
    best[x] = v if wins else b
    index[x] = k if wins else index[x]
    bad[x] += v * np.float32(0.0)  # NaN once any value is not finite


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _fused_class_map(
    acc: np.ndarray,
    wsum: np.ndarray,
    logits: np.ndarray,
    weights: np.ndarray,
    r0: int,
    c0: int,
    has_acc: bool,
    has_last: bool,
    nodata: int,
    out: np.ndarray,
    has_values: bool,
    values: np.ndarray,
    row0: int,
    row1: int,
) -> bool:
    w = out.shape[1]
    c = acc.shape[0] if has_acc else logits.shape[0]
    sigmoid = c == 1  # one class: class 1 where the logit is > 0 (first maximum of [0, v])
    best = np.empty((_BAND, w), np.float32)
    index = np.empty((_BAND, w), np.int32)
    div = np.empty((_BAND, w), np.float32)
    total = np.empty((_BAND, w), np.float32)
    bad = np.zeros(w, np.float32)
    start = np.float32(0.0) if sigmoid else np.float32(-np.inf)
    for band in range(row0, row1, _BAND):
        rows = min(_BAND, row1 - band)
        for i in range(rows):
            r = band + i
            for x in range(w):
                if has_acc and has_last:
                    t = wsum[r, x] + weights[r0 + r, c0 + x]
                elif has_last:
                    t = weights[r0 + r, c0 + x]
                else:
                    t = wsum[r, x]
                total[i, x] = t
                div[i, x] = t if t > 0 else np.float32(1.0)
                best[i, x] = start
                index[i, x] = 0
        for k in range(c):
            stored = np.int32(k + 1 if sigmoid else k)
            for i in range(rows):
                r, bi, ii, di = band + i, best[i], index[i], div[i]
                if has_last and k + 1 < c:  # the next class's run of this row, while this one is read
                    _prefetch_row(logits, k + 1, r0 + r, c0, w)
                if has_acc and has_last:
                    for x in range(w):
                        wx = weights[r0 + r, c0 + x]
                        p = logits[k, r0 + r, c0 + x] * wx
                        p = p if wx != 0 else np.float32(0.0)
                        v = (acc[k, r, x] + p) / di[x]
                        _keep(v, x, stored, bi, ii, bad)
                        if has_values:
                            values[k, r, x] = v
                elif has_last:  # rows sliced first: 20 ms against 26 here (150 classes, 448²); slower with acc
                    lk = logits[k, r0 + r, c0:]
                    wk = weights[r0 + r, c0:]
                    for x in range(w):
                        wx = wk[x]
                        p = lk[x] * wx
                        p = p if wx != 0 else np.float32(0.0)
                        v = p / di[x]
                        _keep(v, x, stored, bi, ii, bad)
                        if has_values:
                            values[k, r, x] = v
                else:
                    for x in range(w):
                        v = acc[k, r, x] / di[x]
                        _keep(v, x, stored, bi, ii, bad)
                        if has_values:
                            values[k, r, x] = v
        for i in range(rows):
            for x in range(w):
                out[band + i, x] = index[i, x] if total[i, x] > 0 else nodata
        if has_values and not sigmoid:  # the softmax's first step, on the band while it is in the cache
            for k in range(c):
                for i in range(rows):
                    r, bi = band + i, best[i]
                    for x in range(w):
                        values[k, r, x] -= bi[x]
    return (bad == 0).all()  # NaN != 0


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _normalise(values: np.ndarray, row0: int, row1: int) -> None:
    c, w = values.shape[0], values.shape[2]
    total = np.empty((_BAND, w), np.float32)
    for band in range(row0, row1, _BAND):
        rows = min(_BAND, row1 - band)
        for i in range(rows):
            total[i] = values[0, band + i]
        for k in range(1, c):
            for i in range(rows):
                ti, vk = total[i], values[k, band + i]
                for x in range(w):
                    ti[x] += vk[x]
        for k in range(c):
            for i in range(rows):
                ti, vk = total[i], values[k, band + i]
                for x in range(w):
                    vk[x] /= ti[x]


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _add_contribution(
    acc: np.ndarray,
    wsum: np.ndarray,
    logits: np.ndarray,
    weights: np.ndarray,
    r0: int,
    c0: int,
    first: bool,
    row0: int,
    row1: int,
) -> None:
    c, _, w = acc.shape
    for band in range(row0, row1, _BAND):
        rows = min(_BAND, row1 - band)
        for k in range(c):
            for i in range(rows):
                r = band + i
                if k + 1 < c:
                    _prefetch_row(logits, k + 1, r0 + r, c0, w)
                lk, wk, ak = logits[k, r0 + r, c0:], weights[r0 + r, c0:], acc[k, r]
                for x in range(w):
                    wx = wk[x]
                    p = lk[x] * wx
                    p = p if wx != 0 else np.float32(0.0)
                    ak[x] = p if first else ak[x] + p
    for r in range(row0, row1):
        for x in range(w):
            wx = weights[r0 + r, c0 + x]
            wsum[r, x] = wx if first else wsum[r, x] + wx


def add_contribution(
    acc: np.ndarray,
    wsum: np.ndarray,
    logits: np.ndarray,
    weights: np.ndarray,
    at: tuple[int, int],
    first: bool,
    row0: int = 0,
    row1: int | None = None,
) -> None:
    """Add a tile's contribution to a cell that is not final: ``acc += logits * weights`` and ``wsum += weights``
    over the cell's window of the tile at ``at`` (arrays as for :func:`fused_class_map`), as the reference does it
    (a product rounded to float32, then a sum; +0 under weight 0). ``first``: the sums are set instead (uninitialised
    before). Only the cell's rows ``[row0, row1)`` (None: to the last)."""
    end = len(wsum) if row1 is None else row1
    _add_contribution(acc, wsum, logits, weights, at[0], at[1], first, row0, end)


def normalise(exps: np.ndarray, row0: int = 0, row1: int | None = None) -> None:
    """Divide ``C x h x w`` float32 ``exps`` by their sum over classes, in place, rows ``[row0, row1)`` (None: to the
    last): the softmax's last step, the sum class by class in order as the reference's (see
    :func:`~densevision.stitch.segmentation.probabilities`), so the same bits."""
    _normalise(exps, row0, exps.shape[1] if row1 is None else row1)


_NONE = np.zeros((1, 1, 1), np.float32)  # stands for an absent accumulator or last contribution


def fused_class_map(
    out: np.ndarray,
    *,
    acc: np.ndarray | None = None,
    wsum: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    at: tuple[int, int] = (0, 0),
    nodata: int = 255,
    values: np.ndarray | None = None,
    rows: tuple[int, int] | None = None,
) -> bool:
    """Fill ``out`` (``h x w``, an integer dtype wide enough for the classes and ``nodata``) with the class map of a
    cell's final blend; return whether every blended logit is finite.

    Args:
        acc, wsum: the cell's sums so far, ``C x h x w`` and ``h x w`` float32 (None: no earlier contribution).
        logits, weights: the last contribution, a whole tile's ``C x T x T`` logits and ``T x T`` weights (0 where the
            tile is not valid), float32 and C-contiguous; the cell is the ``h x w`` window of the tile at ``at`` =
            (row, column) (None: the last contributor was skipped).
        values: where to keep the blended, normalised logits too (``C x h x w`` float32, C-contiguous, not ``acc``),
            for probabilities: with C > 1, less each pixel's maximum over classes (the softmax's first step, as the
            reference's ``x - x.amax(0)``), 0 where no tile had weight; None: not kept.
        rows: only the cell's rows ``[r0, r1)`` of ``out`` (and of ``values``); None: all (a band per thread, see
            :mod:`densevision.stitch.rows`).
    """
    has_acc, has_last = acc is not None, logits is not None
    if not (has_acc or has_last):
        raise ValueError("fused_class_map needs sums so far, a last contribution, or both")
    return bool(
        _fused_class_map(
            acc if acc is not None else _NONE,
            wsum if wsum is not None else _NONE[0],
            logits if logits is not None else _NONE,
            weights if weights is not None else _NONE[0],
            at[0],
            at[1],
            has_acc,
            has_last,
            nodata,
            out,
            values is not None,
            values if values is not None else _NONE,
            *(rows if rows is not None else (0, out.shape[0])),
        )
    )
