"""Merging per-tile detections into whole-image objects, streamed row by row in bounded memory.

Input: each tile's detections in image coordinates (the grid's pixels times ``scale``, e.g. level 0 for a grid
built at a lower level): boxes ``N x 4`` (x0, y0, x1, y1), scores ``N`` (>= 0), labels ``N`` int, optional ids
``N`` int (a payload carried through, e.g. an index into stored masks; by default the running count of detections
added). Boxes are clipped to the tile's window (``tile.x .. tile.x + T`` times ``scale``, cut at the image border):
the model saw nothing beyond it.

Matching. Detections ``a`` and ``b`` *match* when their boxes intersect with positive area and
``iou = |a & b| / |a | b|`` (``match="iou"``) or ``ios = |a & b| / min(|a|, |b|)`` (``match="ios"``) is greater than
``threshold``; class-aware (the default) only detections of the same label match.

Partial views. A detection is *partial* when its box lies within ``edge_margin`` of an interior side of its tile's
window (a side that is not the image border): the object may go on beyond it. Detections are *ranked* by
``score * edge_weight`` if partial, else ``score`` (ties: tile index, then position in the tile), so a whole view
outranks a partial view of the same object unless the partial one scores more than ``1 / edge_weight`` times higher.

Methods, on the graph of matches, visiting detections by rank:

- ``nms``: a detection not yet taken keeps its own box and score and takes its untaken matches (which are dropped).
- ``greedy_nmm`` (SAHI's greedy NMM): the same groups as ``nms``; the group's box is the enclosing box of its
  members, its score their maximum.
- ``nmm`` (SAHI's NMM): each detection joins the group of its best-ranked match ranked above it; one with no such
  match starts a group. Groups are trees of matches, so a group can reach beyond its first detection's matches.
  Box: enclosing box; score: maximum.

A group's label and ``best`` id are its top-ranked detection's; ``members`` lists every source id, top-ranked first.
SAHI's postprocess re-checks each member against the growing merged box and silently drops those that no longer
match; here every detection ends in exactly one group (the members of the output partition the input ids).

Why ``nmm`` + ``ios`` is the default: a box cut by a tile border is mostly inside the whole object's box, so its IoS
with it is near 1 while its IoU is the visible fraction (0.25 for a quarter): IoU-matching keeps both. NMM then
returns the enclosing box, which is the whole object even when no single tile saw it all (as long as the views
match); NMS returns one view's box (the whole one, thanks to the edge ranking, when some tile saw it whole).
Views that do not match one another (an object much wider than the overlap, seen in pieces) stay separate, and
NMM's trees then depend on the ranking: make the overlap at least the size of the largest object.

Streaming, and why it is exact. Every method only looks along matches, so its result is the union of its results on
the connected components of the match graph. A future tile of row ``>= r`` has its window, hence its boxes, below
``ys[r]``; once tile rows ``0 .. r - 1`` are all in, a component whose boxes all end at or above ``ys[r]`` can get no
new match. Such components are merged and handed to the sink; the result is identical to merging all detections at
once, whatever the order of tiles within a row. Fed row by row with ``overlap <= T / 2``, the merger holds the
detections of the row being added and those of the row above that reach into it (components that chain further
down are held until they end): see :attr:`DetectionMerger.held` / :attr:`~DetectionMerger.max_held`.

Cost. A new tile's detections are compared only with the held detections of the tiles whose windows overlap it
(the grid is the spatial index) that lie inside its window, i.e. the overlap strips, and with each other. Candidate
pairs come from all ``n x (n + m)`` pairs when that is small, else from a shapely ``STRtree`` (an R-tree), so a
tile with ``n`` boxes costs about ``O((n + m) log(n + m) + pairs)`` for ``m`` boxes in its strips, not
``O(n * m)``. Components: scipy's ``connected_components`` over the held matches at each completed row; groups: one
vectorised pass (``nmm``) or a loop over the detections that have a match (``nms`` / ``greedy_nmm``: torchvision's
``batched_nms`` does not replace it, as it ranks by score alone, matches by IoU alone and returns the keepers, not
which group each detection joins). In all about ``O(N)`` for ``N`` detections at bounded density (each detection is
in about two row flushes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from numpy.typing import ArrayLike
from scipy import sparse
from scipy.sparse import csgraph

from densevision.errors import ConfigError, InvalidRegionError
from densevision.tiling.grid import Tile, TileGrid

METHODS = ("nms", "nmm", "greedy_nmm")
MATCHES = ("iou", "ios")
_BRUTE_FORCE_PAIRS = 1 << 14  # up to this many box pairs, test them all at once instead of an R-tree


@dataclass(frozen=True, eq=False)
class Detections:
    """``K`` merged detections, in image coordinates.

    ``boxes`` K x 4 float64 (x0, y0, x1, y1); ``scores`` K float64; ``labels`` K int64; ``best`` K int64, the id of
    the top-ranked source detection (whose mask or polygon is the natural one to keep); ``partial`` K bool, True when
    no contributing tile saw the whole merged box (it reaches within ``edge_margin`` of, or past, an interior side of
    every contributing window: it may be cut, e.g. an object larger than the overlap); ``members`` the source ids of
    detection ``k`` are ``members[offsets[k]:offsets[k + 1]]`` (top-ranked first), see :meth:`sources`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    best: np.ndarray
    partial: np.ndarray
    offsets: np.ndarray
    members: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def sources(self, k: int) -> np.ndarray:
        """The ids of the source detections merged into detection ``k``, top-ranked first."""
        return self.members[self.offsets[k] : self.offsets[k + 1]]

    @classmethod
    def empty(cls) -> Detections:
        i64 = np.zeros(0, dtype=np.int64)
        return cls(np.zeros((0, 4)), np.zeros(0), i64, i64, np.zeros(0, bool), np.zeros(1, np.int64), i64)

    @classmethod
    def concatenate(cls, parts: Sequence[Detections]) -> Detections:
        if not parts:
            return cls.empty()
        shifts = np.cumsum([0] + [len(p.members) for p in parts[:-1]])
        return cls(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.best for p in parts]),
            np.concatenate([p.partial for p in parts]),
            np.concatenate([np.zeros(1, np.int64), *(p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True))]),
            np.concatenate([p.members for p in parts]),
        )


# sink(detections): a batch of finished merged detections (never empty); the merger keeps no reference to it.
DetectionSink = Callable[[Detections], None]


@dataclass
class _Chunk:
    """One tile's detections; those with ``alive`` are still held. Detection ``i`` has uid ``uid0 + i``."""

    tile: Tile
    uid0: int
    boxes: np.ndarray  # n x 4, clipped to the window
    scores: np.ndarray
    rank: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    window: np.ndarray  # 4: the tile's window in image coordinates, cut at the image border
    interior: np.ndarray  # 4 bool: left, top, right, bottom sides that are not the image border
    alive: np.ndarray


class DetectionMerger:
    """Merges per-tile detections over ``grid`` and hands finished objects to ``sink`` (see the module docstring).

    Feed every tile once with :meth:`add` (an empty tile: zero detections) or :meth:`skip`, in row-major order of
    rows (any order within a row; other orders are correct but hold more), then call :meth:`finish`.

    Args:
        sink: receives batches of finished :class:`Detections` as rows complete; None: they are collected and
            :meth:`finish` returns them all.
        method: ``nms``, ``nmm`` or ``greedy_nmm``. match: ``iou`` or ``ios``. threshold: match when the value is
            greater than this, in ``[0, 1]``.
        class_agnostic: let detections of different labels match (the group takes its top-ranked label).
        edge_margin: a box within this distance (image units) of an interior side of its window is a partial view.
        edge_weight: partial views rank with ``score * edge_weight`` (in ``(0, 1]``; 1 ranks by score alone).
        scale: image units per grid pixel (e.g. the level's downsample when the grid is at a lower level but
            boxes are in level-0 pixels).

    Example::

        merger = DetectionMerger(grid, writer.write, method="nmm", match="ios")
        for tile, (boxes, scores, labels) in predictions:  # boxes N x 4 in image coordinates
            merger.add(tile, boxes, scores, labels)
        merger.finish()
    """

    def __init__(
        self,
        grid: TileGrid,
        sink: DetectionSink | None = None,
        *,
        method: str = "nmm",
        match: str = "ios",
        threshold: float = 0.5,
        class_agnostic: bool = False,
        edge_margin: float = 2.0,
        edge_weight: float = 0.5,
        scale: float = 1.0,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
        if match not in MATCHES:
            raise ConfigError(f"unknown match criterion {match!r}; choose one of {', '.join(MATCHES)}")
        if not 0 <= threshold <= 1:
            raise ConfigError(f"match threshold must be in [0, 1], got {threshold}")
        if not edge_margin >= 0:
            raise ConfigError(f"edge_margin must be >= 0 (image units), got {edge_margin}")
        if not 0 < edge_weight <= 1:
            raise ConfigError(
                f"edge_weight must be in (0, 1] (1: rank partial views by score alone), got {edge_weight}"
            )
        if not (np.isfinite(scale) and scale > 0):
            raise ConfigError(f"scale (image units per grid pixel) must be positive, got {scale}")
        self.grid = grid
        self.method, self.match, self.threshold = method, match, float(threshold)
        self.class_agnostic = class_agnostic
        self.edge_margin, self.edge_weight, self.scale = float(edge_margin), float(edge_weight), float(scale)
        self._collected: list[Detections] | None = None
        if sink is None:
            collected: list[Detections] = []
            self._collected = collected
            sink = collected.append
        self.sink = sink
        self._xs, self._ys = grid.xs, grid.ys
        t = grid.tile
        self._row_near = [_near(self._ys, i, t) for i in range(len(self._ys))]
        self._col_near = [_near(self._xs, i, t) for i in range(len(self._xs))]
        self._left = [len(self._xs)] * len(self._ys)
        self._seen = np.zeros(len(grid), dtype=bool)
        self._rows_in = 0
        self._chunks: dict[int, _Chunk] = {}  # by tile index, in order of arrival (so of uids)
        self._edges: list[np.ndarray] = []  # 2 x E uids of matching held detections
        self._next_uid = 0
        self._held = self._max_held = self._emitted = 0

    @property
    def held(self) -> int:
        """Detections held now (added, not yet merged and emitted)."""
        return self._held

    @property
    def max_held(self) -> int:
        """The most detections ever held at once."""
        return self._max_held

    @property
    def added(self) -> int:
        """Detections added so far."""
        return self._next_uid

    @property
    def emitted(self) -> int:
        """Merged detections handed to the sink so far."""
        return self._emitted

    def add(
        self,
        tile: Tile,
        boxes: ArrayLike,
        scores: ArrayLike,
        labels: ArrayLike,
        ids: ArrayLike | None = None,
    ) -> None:
        """Add ``tile``'s detections: boxes ``N x 4`` (x0, y0, x1, y1) in image coordinates, scores ``N``, labels
        ``N`` int, ids ``N`` int or None (then the running count of detections added). Arrays or CPU tensors."""
        self._check_tile(tile)
        b, s, lab, ident = self._validate(tile, boxes, scores, labels, ids)
        window, interior = self._window(tile)
        # A tile larger than the image is padded, and a model may find things in the padding: not in the image.
        inside = (b[:, 0] < self.grid.width * self.scale) & (b[:, 1] < self.grid.height * self.scale)
        if not inside.all():
            b, s, lab = b[inside], s[inside], lab[inside]
            ident = ident[inside] if ident is not None else None
        n = len(b)
        uid0 = self._next_uid
        if n:
            tol = self.grid.tile * self.scale / 4
            out = (b[:, :2] < window[:2] - tol).any(axis=1) | (b[:, 2:] > window[2:] + tol).any(axis=1)
            if out.any():
                k = int(np.flatnonzero(out)[0])
                raise InvalidRegionError(
                    f"tile #{tile.index} (row {tile.row}, col {tile.col}): box {k} = {b[k].tolist()} lies more than "
                    f"{tol:g} outside the tile's window {window.tolist()}; boxes must be in image coordinates "
                    f"(tile-local box + (tile.x, tile.y), times scale={self.scale:g})"
                )
            b = np.clip(b, window[[0, 1, 0, 1]], window[[2, 3, 2, 3]])
            edge = _touches(b, window, interior, self.edge_margin)
            chunk = _Chunk(
                tile=tile,
                uid0=uid0,
                boxes=b,
                scores=s,
                rank=np.where(edge, s * self.edge_weight, s),
                labels=lab,
                ids=np.arange(uid0, uid0 + n, dtype=np.int64) if ident is None else ident,
                window=window,
                interior=interior,
                alive=np.ones(n, dtype=bool),
            )
            self._link(chunk)
            self._chunks[tile.index] = chunk
            self._next_uid += n
            self._held += n
            self._max_held = max(self._max_held, self._held)
        self._tile_in(tile)

    def skip(self, tile: Tile) -> None:
        """Record that ``tile`` has no prediction (e.g. no tissue): same as adding zero detections."""
        self._check_tile(tile)
        self._tile_in(tile)

    def finish(self, *, allow_missing: bool = False) -> Detections:
        """Merge and emit everything still held. Returns all merged detections if no sink was given, else an empty
        :class:`Detections` (they went to the sink).

        Raises :class:`InvalidRegionError` (emitting nothing) if a tile was neither added nor skipped, unless
        ``allow_missing``: then missing tiles count as empty.
        """
        missing = np.flatnonzero(~self._seen)
        if missing.size and not allow_missing:
            raise InvalidRegionError(
                f"{missing.size} of {len(self._seen)} tiles were neither added nor skipped (the first is tile "
                f"#{missing[0]}); add or skip every tile of the grid, or finish(allow_missing=True)"
            )
        self._flush(np.inf)
        self._seen[:] = True
        if self._collected is None:
            return Detections.empty()
        return Detections.concatenate(self._collected)

    # ---- input -----------------------------------------------------------------------------------------------

    def _check_tile(self, tile: Tile) -> None:
        self.grid.require(tile, "the merger")
        if self._seen[tile.index]:
            raise InvalidRegionError(
                f"tile #{tile.index} (row {tile.row}, col {tile.col}) was already added or skipped; "
                "feed each tile once (a resumed run must start a new merger)"
            )

    def _validate(
        self, tile: Tile, boxes: ArrayLike, scores: ArrayLike, labels: ArrayLike, ids: ArrayLike | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        where = f"tile #{tile.index} (row {tile.row}, col {tile.col})"
        b = np.asarray(boxes, dtype=np.float64)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise InvalidRegionError(f"{where}: expected boxes of shape N x 4 (x0, y0, x1, y1), got {b.shape}")
        n = len(b)
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (n,) and not (n == 0 and s.size == 0):
            raise InvalidRegionError(f"{where}: expected {n} scores (one per box), got shape {s.shape}")
        s = s.reshape(n)
        lab = _integers(labels, n, "labels", where)
        ident = None if ids is None else _integers(ids, n, "ids", where)
        if not np.isfinite(b).all():
            k = int(np.flatnonzero(~np.isfinite(b).all(axis=1))[0])
            raise InvalidRegionError(f"{where}: box {k} = {b[k].tolist()} is not finite; check the model output")
        bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise InvalidRegionError(
                f"{where}: box {k} = {b[k].tolist()} has x1 < x0 or y1 < y0; boxes must be (x0, y0, x1, y1) corners "
                "(convert (cx, cy, w, h) or (x, y, w, h) first)"
            )
        if not (np.isfinite(s) & (s >= 0)).all():
            k = int(np.flatnonzero(~(np.isfinite(s) & (s >= 0)))[0])
            raise InvalidRegionError(f"{where}: score {k} = {s[k]} must be finite and >= 0 (probabilities, not logits)")
        return b, s, lab, ident

    def _window(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        g, t = self.grid, self.grid.tile
        x1, y1 = min(tile.x + t, g.width), min(tile.y + t, g.height)
        window = np.array([tile.x, tile.y, x1, y1], dtype=np.float64) * self.scale
        interior = np.array([tile.x > 0, tile.y > 0, x1 < g.width, y1 < g.height])
        return window, interior

    # ---- matching --------------------------------------------------------------------------------------------

    def _link(self, new: _Chunk) -> None:
        """Record the matches of ``new``'s detections with each other and with held ones of overlapping tiles."""
        (wx0, wy0, wx1, wy1), cols = new.window.tolist(), len(self._xs)
        boxes, labels, uids = [new.boxes], [new.labels], [new.uid0 + np.arange(len(new.boxes))]
        r0, r1 = self._row_near[new.tile.row]
        c0, c1 = self._col_near[new.tile.col]
        for r in range(r0, r1):
            for c in range(c0, c1):
                ch = self._chunks.get(r * cols + c)
                if ch is None:
                    continue
                bx = ch.boxes
                k = np.flatnonzero(ch.alive & (bx[:, 0] < wx1) & (bx[:, 2] > wx0) & (bx[:, 1] < wy1) & (bx[:, 3] > wy0))
                if k.size:
                    boxes.append(bx[k])
                    labels.append(ch.labels[k])
                    uids.append(ch.uid0 + k)
        b, lab, uid = np.concatenate(boxes), np.concatenate(labels), np.concatenate(uids)
        i, j = intersecting_pairs(new.boxes, b)
        keep = (j >= len(new.boxes)) | (i < j)  # each pair within the tile once
        if not self.class_agnostic:
            keep &= new.labels[i] == lab[j]
        i, j = i[keep], j[keep]
        m = match_values(new.boxes[i], b[j], self.match) > self.threshold
        if m.any():
            self._edges.append(np.stack([uid[i[m]], uid[j[m]]]))

    # ---- streaming -------------------------------------------------------------------------------------------

    def _tile_in(self, tile: Tile) -> None:
        self._seen[tile.index] = True
        self._left[tile.row] -= 1
        rows_in = self._rows_in
        while self._rows_in < len(self._ys) and self._left[self._rows_in] == 0:
            self._rows_in += 1
        if self._rows_in > rows_in:
            done = self._rows_in == len(self._ys)
            self._flush(np.inf if done else self._ys[self._rows_in] * self.scale)

    def _flush(self, limit: float) -> None:
        """Merge and emit the components of held detections whose boxes all end at or above ``limit``."""
        chunks = list(self._chunks.values())
        if not chunks:
            return
        held = [np.flatnonzero(c.alive) for c in chunks]
        uids = np.concatenate([c.uid0 + k for c, k in zip(chunks, held, strict=True)])  # increasing
        y1 = np.concatenate([c.boxes[k, 3] for c, k in zip(chunks, held, strict=True)])
        edges = np.concatenate(self._edges, axis=1) if self._edges else np.zeros((2, 0), dtype=np.int64)
        u, v = np.searchsorted(uids, edges[0]), np.searchsorted(uids, edges[1])
        comp = _components(len(uids), u, v)
        blocked = np.zeros(len(uids), dtype=bool)
        blocked[comp[y1 > limit]] = True
        final = ~blocked[comp]
        if not final.any():
            return
        fe = final[u]  # a match joins one component: both ends are final or neither
        self._edges = [edges[:, ~fe]] if not fe.all() else []
        pos = np.cumsum(final) - 1  # held position -> position among the final ones

        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("boxes", "scores", "rank", "labels", "ids", "tile")}
        parts["local"] = []
        windows, interiors, counts = [], [], []
        start = 0
        for c, k in zip(chunks, held, strict=True):
            f = k[final[start : start + len(k)]]
            start += len(k)
            if not f.size:
                continue
            parts["boxes"].append(c.boxes[f])
            parts["scores"].append(c.scores[f])
            parts["rank"].append(c.rank[f])
            parts["labels"].append(c.labels[f])
            parts["ids"].append(c.ids[f])
            parts["tile"].append(np.full(f.size, c.tile.index, dtype=np.int64))
            parts["local"].append(f)
            windows.append(c.window)
            interiors.append(c.interior)
            counts.append(f.size)
            c.alive[f] = False
            if not c.alive.any():
                del self._chunks[c.tile.index]
        cat = {k: np.concatenate(p) for k, p in parts.items()}
        cat["window"] = np.repeat(np.stack(windows), counts, axis=0)
        cat["interior"] = np.repeat(np.stack(interiors), counts, axis=0)
        self._held -= len(cat["scores"])
        self._emit(self._merge(cat, pos[u[fe]], pos[v[fe]]))

    def _merge(self, d: dict[str, np.ndarray], u: np.ndarray, v: np.ndarray) -> Detections:
        """Group final detections ``d`` (closed under matches ``u``-``v``) by the method and build the results."""
        n = len(d["scores"])
        order = np.lexsort((d["local"], d["tile"], -d["rank"]))  # by rank
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        root = _nmm_groups(pos, order, u, v) if self.method == "nmm" else _nms_groups(order, u, v)
        keepers = np.flatnonzero(root == np.arange(n))
        keepers = keepers[np.lexsort((d["local"][keepers], d["tile"][keepers]))]  # output order: by tile
        gid = np.empty(n, dtype=np.int64)
        gid[keepers] = np.arange(len(keepers))
        g = gid[root]
        srt = np.lexsort((pos, g))  # grouped, each group top-ranked first
        counts = np.bincount(g, minlength=len(keepers))
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
        starts = offsets[:-1]
        if self.method == "nms":
            boxes, scores = d["boxes"][keepers], d["scores"][keepers]
        else:
            sb = d["boxes"][srt]
            boxes = np.concatenate(
                [np.minimum.reduceat(sb[:, :2], starts, axis=0), np.maximum.reduceat(sb[:, 2:], starts, axis=0)],
                axis=1,
            )
            scores = np.maximum.reduceat(d["scores"][srt], starts)
        # partial: no member's window holds the merged box clear of its interior sides
        mb, win = boxes[g[srt]], d["window"][srt]
        eps = 1e-6 * self.scale
        inside = (mb[:, :2] >= win[:, :2] - eps).all(axis=1) & (mb[:, 2:] <= win[:, 2:] + eps).all(axis=1)
        whole = inside & ~_touches(mb, win, d["interior"][srt], self.edge_margin)
        return Detections(
            boxes=boxes,
            scores=scores,
            labels=d["labels"][keepers],
            best=d["ids"][keepers],
            partial=~np.logical_or.reduceat(whole, starts),
            offsets=offsets,
            members=d["ids"][srt],
        )

    def _emit(self, dets: Detections) -> None:
        self._emitted += len(dets)
        self.sink(dets)


def merge_detections(
    grid: TileGrid,
    items: Iterable[
        tuple[Tile, ArrayLike, ArrayLike, ArrayLike] | tuple[Tile, ArrayLike, ArrayLike, ArrayLike, ArrayLike]
    ],
    **options: object,
) -> Detections:
    """All merged detections of ``items`` = ``(tile, boxes, scores, labels[, ids])`` (tiles not given are empty);
    ``options`` as for :class:`DetectionMerger`. For images whose detections fit in memory."""
    merger = DetectionMerger(grid, None, **options)  # type: ignore[arg-type]
    for item in items:
        merger.add(*item)
    return merger.finish(allow_missing=True)


# ---- geometry (pure functions) -------------------------------------------------------------------------------


def match_values(a: np.ndarray, b: np.ndarray, match: str) -> np.ndarray:
    """IoU or IoS of paired boxes ``a[k]``, ``b[k]`` (both ``K x 4``); 0 where they do not overlap.

    Pairs, not the ``N x M`` matrix of ``torchvision.ops.box_iou`` (which has no IoS either): the merger's candidate
    pairs are sparse."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    denom = area_a + area_b - inter if match == "iou" else np.minimum(area_a, area_b)
    return np.divide(inter, denom, out=np.zeros_like(inter), where=inter > 0)


def intersecting_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with ``a[i]`` and ``b[j]`` (``N x 4``, ``M x 4``) intersecting with positive area.

    Boxes are half-open pixel edges, so boxes that only touch (a shared side or corner) do not intersect, nor does a
    box of zero width or height. Small inputs test all ``N x M`` pairs at once; larger ones take the candidates from
    a shapely ``STRtree`` over ``b`` (envelope intersections, touching included) and keep those whose intersection
    is positive along both axes. Each pair once, in no particular order.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n * m <= _BRUTE_FORCE_PAIRS:
        iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
        ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
        i, j = np.nonzero((iw > 0) & (ih > 0))
        return i.astype(np.int64), j.astype(np.int64)
    # The tree needs geometries but only their envelopes count: a box's diagonal is the cheapest one with the box as
    # its envelope. The merger passes a tile's boxes followed by their neighbours as b: then a's are b's first ones.
    lines = shapely.linestrings(b.reshape(m, 2, 2))
    probes = lines[:n] if n <= m and np.array_equal(a, b[:n]) else shapely.linestrings(a.reshape(n, 2, 2))
    i, j = shapely.STRtree(lines).query(probes)
    keep = (np.minimum(a[i, 2], b[j, 2]) > np.maximum(a[i, 0], b[j, 0])) & (
        np.minimum(a[i, 3], b[j, 3]) > np.maximum(a[i, 1], b[j, 1])
    )
    return i[keep].astype(np.int64, copy=False), j[keep].astype(np.int64, copy=False)


def _touches(boxes: np.ndarray, window: np.ndarray, interior: np.ndarray, margin: float) -> np.ndarray:
    """Whether each box (``K x 4``) lies within ``margin`` of an interior side of its window (``4`` or ``K x 4``)."""
    near = np.stack(
        [
            boxes[:, 0] <= window[..., 0] + margin,
            boxes[:, 1] <= window[..., 1] + margin,
            boxes[:, 2] >= window[..., 2] - margin,
            boxes[:, 3] >= window[..., 3] - margin,
        ],
        axis=-1,
    )
    return np.asarray((near & interior).any(axis=-1))


def _near(starts: list[int], i: int, tile: int) -> tuple[int, int]:
    """The range of tile indices along one axis whose windows overlap window ``i``'s (``|p_j - p_i| < T``)."""
    lo = i
    while lo > 0 and starts[i] - starts[lo - 1] < tile:
        lo -= 1
    hi = i + 1
    while hi < len(starts) and starts[hi] - starts[i] < tile:
        hi += 1
    return lo, hi


def _integers(x: ArrayLike, n: int, name: str, where: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.size == 0 and n == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.shape != (n,):
        raise InvalidRegionError(f"{where}: expected {n} {name} (one per box), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRegionError(f"{where}: {name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes with edges ``u``-``v``: a component label per node."""
    if not u.size:
        return np.arange(n)
    graph = sparse.csr_array((np.ones(len(u)), (u, v)), shape=(n, n))
    return csgraph.connected_components(graph, directed=False)[1]


def _nmm_groups(pos: np.ndarray, order: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """NMM: each node's parent is its best-ranked match ranked above it; returns each node's root."""
    n = len(pos)
    parent = np.arange(n)
    if u.size:
        hi = np.where(pos[u] < pos[v], u, v)
        lo = u + v - hi
        best = np.full(n, n)
        np.minimum.at(best, lo, pos[hi])
        has = best < n
        parent[has] = order[best[has]]
        while True:  # parents rank strictly higher: no cycles
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


def _nms_groups(order: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """NMS grouping: in rank order, each node not yet taken takes its untaken matches; returns each node's keeper."""
    n = len(order)
    group = np.full(n, -1)
    if u.size:
        a, b = np.concatenate([u, v]), np.concatenate([v, u])
        srt = np.argsort(a, kind="stable")
        adj = b[srt]
        indptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.bincount(a, minlength=n))])
        deg = np.diff(indptr)
        for p in order[deg[order] > 0].tolist():
            if group[p] >= 0:
                continue
            group[p] = p
            nb = adj[indptr[p] : indptr[p + 1]]
            group[nb[group[nb] < 0]] = p
    alone = group < 0
    group[alone] = np.flatnonzero(alone)
    return group
