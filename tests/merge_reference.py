"""A brute-force whole-image reference for merging tile detections, written without densevision's matching code.

All-pairs IoU / IoS as a dense ``N x N`` matrix (numpy broadcasting, checked against ``torchvision.ops.box_iou`` in
``test_stitch_detection.py``), then SAHI's own loops (``nmm()``'s keep_to_merge_list / merge_to_keep, and
``greedy_nmm()``'s grouping, which is also NMS's) over every detection of every tile at once, with the ranking and
clipping that :mod:`densevision.stitch.detection` documents: boxes clipped to their tile's window; a box within
``margin`` of an interior side of its window ranks at ``score * weight``; ties by tile index, then position.
Tests compare the streamed merger, ``merge_detections`` and ``detect_objects`` with it.
"""

from __future__ import annotations

import numpy as np


def pairwise(a: np.ndarray, b: np.ndarray, match: str) -> np.ndarray:
    """``N x M`` IoU (``match="iou"``) or IoS (intersection over the smaller area) of boxes ``a`` (``N x 4``) and
    ``b`` (``M x 4``), x0 y0 x1 y1; 0 where the intersection has no area (so zero-area boxes never match)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    denom = area_a + area_b - inter if match == "iou" else np.minimum(area_a, area_b)
    out = np.zeros(inter.shape)
    pos = inter > 0
    out[pos] = (inter / np.where(pos, denom, 1.0))[pos]
    return out


def tile_window(grid, tile) -> np.ndarray:
    """The tile's window ``x0 y0 x1 y1`` in grid pixels, cut at the image border."""
    return np.array(
        [tile.x, tile.y, min(tile.x + grid.tile, grid.width), min(tile.y + grid.tile, grid.height)], dtype=np.float64
    )


def reference(grid, items, method, match, threshold=0.5, agnostic=False, margin=2.0, weight=0.5) -> dict:
    """Merge ``items`` = ``(tile, boxes, scores, labels[, ids])`` (image coordinates = grid pixels; ids default to
    the running count of detections, as the merger's) all at once. Returns ``{frozenset(member ids): (box, score,
    label, best id)}`` per merged object."""
    tiles, next_id = [], 0
    for item in items:
        t, b, s, lab = item[:4]
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        ids = np.asarray(item[4]) if len(item) > 4 else np.arange(next_id, next_id + len(b))
        next_id += len(b)
        if len(b):
            w = tile_window(grid, t)
            b = np.clip(b, w[[0, 1, 0, 1]], w[[2, 3, 2, 3]])  # the model saw nothing beyond its window
            tiles.append((t, b, np.asarray(s, dtype=np.float64), np.asarray(lab), ids))
    if not tiles:
        return {}
    boxes = np.concatenate([b for _, b, _, _, _ in tiles])
    scores = np.concatenate([s for _, _, s, _, _ in tiles])
    labels = np.concatenate([lab for _, _, _, lab, _ in tiles])
    ids = np.concatenate([i for *_, i in tiles])
    tile_idx = np.concatenate([np.full(len(b), t.index) for t, b, *_ in tiles])
    local = np.concatenate([np.arange(len(b)) for _, b, *_ in tiles])
    edge = np.zeros(len(boxes), bool)
    for t, b, *_ in tiles:
        w = tile_window(grid, t)
        inner = [t.x > 0, t.y > 0, w[2] < grid.width, w[3] < grid.height]
        near = [b[:, 0] <= w[0] + margin, b[:, 1] <= w[1] + margin, b[:, 2] >= w[2] - margin, b[:, 3] >= w[3] - margin]
        edge[tile_idx == t.index] = np.any([n & i for n, i in zip(near, inner, strict=True)], axis=0)
    rank = np.where(edge, scores * weight, scores)
    order = np.lexsort((local, tile_idx, -rank))
    m = pairwise(boxes, boxes, match) > threshold
    if not agnostic:
        m &= labels[:, None] == labels[None, :]
    np.fill_diagonal(m, False)
    groups: dict[int, list[int]] = {}
    if method == "nmm":  # SAHI's nmm(): keep_to_merge_list / merge_to_keep
        merge_to_keep: dict[int, int] = {}
        for p in order:
            matched = [q for q in order[::-1] if m[p, q]]
            if p not in merge_to_keep:
                groups[p] = []
                for q in matched:
                    if q not in merge_to_keep:
                        groups[p].append(q)
                        merge_to_keep[q] = p
            else:
                keep = merge_to_keep[p]
                for q in matched:
                    if q not in groups and q not in merge_to_keep:
                        groups[keep].append(q)
                        merge_to_keep[q] = keep
    else:  # SAHI's greedy_nmm() grouping, which is also NMS's
        left = list(order)
        while left:
            p = left.pop(0)
            groups[p] = [q for q in left if m[p, q]]
            left = [q for q in left if not m[p, q]]
    out = {}
    for p, members in groups.items():
        g = [p, *members]
        if method == "nms":
            box, score = boxes[p], scores[p]
        else:
            box = np.concatenate([boxes[g, :2].min(0), boxes[g, 2:].max(0)])
            score = scores[g].max()
        out[frozenset(ids[g].tolist())] = (box, score, labels[p], ids[p])
    return out
