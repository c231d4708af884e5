"""Detection merging across tiles: planted objects straddling tile borders and corners come out once with their
whole box; the streamed merge equals a brute-force whole-image merge (SAHI's loops); bounded memory; bad input."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from merge_reference import pairwise, reference

from densevision.errors import ConfigError, InvalidRegionError
from densevision.stitch.detection import (
    DetectionMerger,
    Detections,
    intersecting_pairs,
    merge_detections,
)
from densevision.tiling.grid import TileGrid

# ---- a generated scene and a detector that sees exactly what is in its window ---------------------------------


def plant(grid: TileGrid, seed: int = 0, max_size: int | None = None, classes: int = 3):
    """Non-overlapping boxes (``K x 4``) and labels: one on every tile corner overlap and on tile borders, then a
    jittered lattice fill. Sizes up to the overlap - 6, so every object lies whole inside some tile, >= 3 px clear
    of its sides (more than the edge margin 2 plus the detector's noise 0.4)."""
    rng = np.random.default_rng(seed)
    size_max = max_size or grid.overlap - 6
    boxes: list[np.ndarray] = []

    def free(b: np.ndarray) -> bool:
        if b[0] < 0 or b[1] < 0 or b[2] > grid.width or b[3] > grid.height:
            return False
        return all(not (b[0] < o[2] + 2 and o[0] < b[2] + 2 and b[1] < o[3] + 2 and o[1] < b[3] + 2) for o in boxes)

    def centred(cx: float, cy: float) -> None:
        w, h = rng.uniform(size_max / 2, size_max, 2)
        b = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if free(b):
            boxes.append(b)

    t = grid.tile
    mid_x = [(a + t + b) / 2 for a, b in itertools.pairwise(grid.xs)]  # centres of the overlap strips
    mid_y = [(a + t + b) / 2 for a, b in itertools.pairwise(grid.ys)]
    for cy in mid_y:
        for cx in mid_x:
            centred(cx, cy)  # tile corners: seen by four tiles
    for cx in mid_x:
        for cy in rng.uniform(0, grid.height, 3):
            centred(cx + rng.uniform(-4, 4), cy)  # across vertical borders
    for cy in mid_y:
        for cx in rng.uniform(0, grid.width, 3):
            centred(cx, cy + rng.uniform(-4, 4))
    for _ in range(60):
        centred(*rng.uniform(0, [grid.width, grid.height]))
    truth = np.array(boxes).reshape(-1, 4)
    return truth, rng.integers(0, classes, len(truth))


def window(grid: TileGrid, tile) -> np.ndarray:
    return np.array([tile.x, tile.y, min(tile.x + grid.tile, grid.width), min(tile.y + grid.tile, grid.height)], float)


def detect(grid: TileGrid, tile, truth: np.ndarray, labels: np.ndarray, rng, noise: float = 0.4):
    """The visible part (>= 2 px each way) of every planted box, clipped to the window, +-``noise`` px; score
    0.3 + 0.6 x visible fraction +- 0.02."""
    win = window(grid, tile)
    vis = np.concatenate([np.maximum(truth[:, :2], win[:2]), np.minimum(truth[:, 2:], win[2:])], axis=1)
    wh = vis[:, 2:] - vis[:, :2]
    k = np.flatnonzero((wh >= 2).all(axis=1))
    frac = wh[k].prod(axis=1) / (truth[k, 2:] - truth[k, :2]).prod(axis=1)
    boxes = vis[k] + rng.uniform(-noise, noise, (len(k), 4))
    boxes = np.clip(boxes, np.tile(win[:2], 2), np.tile(win[2:], 2))
    scores = 0.3 + 0.6 * frac + rng.uniform(-0.02, 0.02, len(k))
    return boxes, scores, labels[k], k


def run(grid, truth, labels, seed=0, order_seed=None, sink=None, **options):
    rng = np.random.default_rng(seed)
    items = []
    for tile in grid:
        boxes, scores, labs, k = detect(grid, tile, truth, labels, rng)
        items.append((tile, boxes, scores, labs, tile.index * 1000 + np.arange(len(k))))
    if order_seed is not None:  # shuffle within each row of tiles
        perm = np.random.default_rng(order_seed)
        items.sort(key=lambda it: (it[0].row, perm.random()))
    merger = DetectionMerger(grid, sink, **options)
    for it in items:
        merger.add(*it)
    return merger.finish(), merger, items


def assign(result: Detections, truth: np.ndarray):
    """For each planted box, the results matching it with IoU > 0.5."""
    return [np.flatnonzero(v > 0.5) for v in pairwise(truth, result.boxes, "iou")]


# ---- a brute-force whole-image reference: SAHI's loops on a dense match matrix ------------------------------


# ``reference`` (tests/merge_reference.py): every tile's detections at once, all-pairs IoU / IoS computed there
# (not with densevision's match_values), SAHI's nmm() / greedy_nmm() loops.


def test_the_references_match_values_are_torchvisions_iou_and_hand_computed_ios():
    from torchvision.ops import box_iou

    rng = np.random.default_rng(11)
    xy = rng.uniform(0, 100, (40, 2))
    a = np.concatenate([xy, xy + rng.uniform(0, 30, (40, 2))], axis=1)
    a[0] = [10, 10, 10, 40]  # zero width
    xy = rng.uniform(0, 100, (30, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 30, (30, 2))], axis=1)
    expected = box_iou(torch_boxes(a), torch_boxes(b)).numpy()
    np.testing.assert_allclose(pairwise(a, b, "iou"), expected, rtol=1e-12, atol=1e-12)
    # by hand: 10 x 10 inside 20 x 20 (ios 1, iou 1/4); two 10 x 20 sharing 5 x 20 (ios 100 / 200, iou 100 / 300)
    boxes = [[0.0, 0, 20, 20], [5, 5, 15, 15], [30, 0, 40, 20], [35, 0, 45, 20], [50, 0, 60, 10]]
    ios, iou = pairwise(boxes, boxes, "ios"), pairwise(boxes, boxes, "iou")
    assert (ios[0, 1], iou[0, 1], ios[2, 3], iou[2, 3]) == (1.0, 0.25, 0.5, pytest.approx(1 / 3))
    assert ios[0, 4] == iou[1, 2] == 0.0  # disjoint
    edge = pairwise([[0.0, 0, 10, 10]], [[10.0, 0, 20, 10]], "ios")
    assert edge[0, 0] == 0.0  # touching sides: no area in common


def torch_boxes(a: np.ndarray):
    import torch

    return torch.as_tensor(a, dtype=torch.float64)


def as_dict(result: Detections):
    return {
        frozenset(result.sources(k).tolist()): (result.boxes[k], result.scores[k], result.labels[k], result.best[k])
        for k in range(len(result))
    }


def assert_same(result: Detections, expected: dict) -> None:
    got = as_dict(result)
    assert len(got) == len(result), "a source id in two results"
    assert got.keys() == expected.keys()
    for key, (box, score, label, best) in expected.items():
        gbox, gscore, glabel, gbest = got[key]
        np.testing.assert_allclose(gbox, box, atol=1e-9)
        assert (gscore, glabel, gbest) == (pytest.approx(score), label, best)


# ---- 1. every planted object once, with its whole box -----------------------------------------------------


@pytest.mark.parametrize("method,match", [("nmm", "ios"), ("greedy_nmm", "ios"), ("nms", "ios")])
@pytest.mark.parametrize("size", [(333, 250), (200, 64), (50, 40)])  # awkward, one row, smaller than a tile
def test_every_planted_object_once_with_its_whole_box(method, match, size):
    grid = TileGrid(*size, 64, 24)
    truth, labels = plant(grid, seed=1)
    result, merger, items = run(grid, truth, labels, method=method, match=match)
    assert len(truth) >= (15 if size[0] > 100 else 3)
    hits = assign(result, truth)
    assert [len(h) for h in hits] == [1] * len(truth), "missing or duplicated objects"
    assert len(result) == len(truth)
    k = np.concatenate(hits)
    np.testing.assert_array_less(np.abs(result.boxes[k] - truth).max(axis=1), 2)
    np.testing.assert_array_equal(result.labels[k], labels)
    assert not result.partial.any()  # objects no larger than the overlap: some tile saw each whole
    # every source detection is in exactly one result
    assert sorted(result.members.tolist()) == sorted(np.concatenate([it[4] for it in items]).tolist())
    assert merger.held == 0 and merger.emitted == len(result)


def test_the_scene_really_cuts_objects():
    grid = TileGrid(333, 250, 64, 24)
    truth, labels = plant(grid, seed=1)
    rng = np.random.default_rng(0)
    views = np.bincount(np.concatenate([detect(grid, t, truth, labels, rng)[3] for t in grid]), minlength=len(truth))
    assert (views >= 4).sum() >= 15 and (views >= 2).mean() > 0.8  # many on corners, most on borders


def test_nms_with_iou_leaves_duplicates_in_the_scene():
    grid = TileGrid(333, 250, 64, 24)
    truth, labels = plant(grid, seed=1)
    result = run(grid, truth, labels, method="nms", match="iou")[0]
    counts = [len(h) for h in assign(result, truth)]
    assert len(result) >= len(truth) + 5  # slivers (IoU < 0.5 with the whole view) survive as extra objects
    assert min(counts) == 1  # (the whole views are all there)


def test_nms_with_iou_keeps_border_cut_duplicates():
    # The reason for IoS + NMM: a sliver of an object seen by the next tile has IoU = its visible fraction with
    # the whole view (here 16 / 40), so IoU matching keeps both; IoS is 1.
    grid = TileGrid(160, 64, 64, 32)  # xs = 0, 32, 64, 96
    tiles = list(grid)
    whole = np.array([[40.0, 10, 80, 50]])  # inside tile 1 (32..96), clear of its sides
    sliver = np.array([[64.0, 10, 80, 50]])  # tile 2 (64..128) sees 16 of its 40 px, up to its left side
    items = [
        (tiles[1], whole, [0.9], [0]),
        (tiles[2], sliver, [0.95], [0]),
    ]
    iou = merge_detections(grid, items, method="nms", match="iou")
    assert len(iou) == 2
    for method in ("nms", "nmm", "greedy_nmm"):
        res = merge_detections(grid, items, method=method, match="ios")
        assert len(res) == 1 and res.boxes[0].tolist() == whole[0].tolist(), method
        assert res.sources(0).tolist() == [0, 1]  # default ids: the order detections were added
        assert not res.partial[0]
    # NMS keeps the whole view although the sliver scored higher: partial views rank at half their score ...
    res = merge_detections(grid, items, method="nms", match="ios")
    assert res.scores[0] == 0.9 and res.best[0] == 0
    # ... and by score alone, the sliver's box wins; NMM still returns the enclosing box
    res = merge_detections(grid, items, method="nms", match="ios", edge_weight=1.0)
    assert res.boxes[0].tolist() == sliver[0].tolist() and res.scores[0] == 0.95
    res = merge_detections(grid, items, method="nmm", match="ios", edge_weight=1.0)
    assert res.boxes[0].tolist() == whole[0].tolist() and res.scores[0] == 0.95 and res.best[0] == 1


def test_object_larger_than_any_view_is_whole_after_nmm_and_flagged_partial():
    grid = TileGrid(128, 64, 64, 32)  # xs = 0, 32, 64
    t0, t1, t2 = list(grid)
    # an object at x 40..100 wider than the overlap: every view is cut by an interior side (ranked at half score)
    items = [
        (t0, [[40.0, 5, 64, 30]], [0.8], [1]),
        (t1, [[40.0, 5, 96, 30]], [0.9], [1]),
        (t2, [[64.0, 5, 100, 30]], [0.7], [1]),
    ]
    res = merge_detections(grid, items)
    assert len(res) == 1 and res.boxes[0].tolist() == [40, 5, 100, 30] and res.partial[0]
    assert res.sources(0).tolist() == [1, 0, 2] and res.scores[0] == 0.9


# ---- 2. the streamed merge equals a whole-image merge -----------------------------------------------------


@pytest.mark.parametrize("method", ["nms", "nmm", "greedy_nmm"])
@pytest.mark.parametrize("match", ["iou", "ios"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_streamed_merge_equals_whole_image_reference(method, match, agnostic):
    # Crowded, overlapping objects (bigger than the overlap), low threshold: long chains of matches across tiles.
    grid = TileGrid(260, 230, 64, 20)
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, [240, 210], (70, 2))
    truth = np.concatenate([xy, xy + rng.uniform(8, 40, (70, 2))], axis=1).clip(0, [260, 230, 260, 230])
    labels = rng.integers(0, 2, 70)
    result, _, items = run(
        grid, truth, labels, seed=3, order_seed=5, method=method, match=match, threshold=0.3, class_agnostic=agnostic
    )
    assert_same(result, reference(grid, items, method, match, 0.3, agnostic))
    assert len(result) < sum(len(it[1]) for it in items)  # merging happened


def test_tile_order_within_rows_does_not_change_the_result():
    grid = TileGrid(333, 250, 64, 24)
    truth, labels = plant(grid, seed=2)
    a = run(grid, truth, labels, seed=4)[0]
    b = run(grid, truth, labels, seed=4, order_seed=9)[0]
    for f in ("boxes", "scores", "labels", "best", "partial", "offsets", "members"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_class_aware_and_agnostic():
    grid = TileGrid(100, 100, 128)
    tile = next(iter(grid))
    boxes = [[10.0, 10, 50, 50], [12, 11, 50, 52], [60, 60, 90, 90]]
    items = [(tile, boxes, [0.6, 0.8, 0.5], [0, 1, 0])]
    aware = merge_detections(grid, items, method="nms", match="iou")
    assert sorted(aware.labels.tolist()) == [0, 0, 1] and len(aware) == 3
    agnostic = merge_detections(grid, items, method="nms", match="iou", class_agnostic=True)
    assert len(agnostic) == 2
    k = int(np.flatnonzero(agnostic.boxes[:, 0] < 55)[0])
    assert agnostic.labels[k] == 1 and agnostic.scores[k] == 0.8 and agnostic.sources(k).tolist() == [1, 0]
    nmm = merge_detections(grid, items, method="nmm", match="iou", class_agnostic=True)
    k = int(np.flatnonzero(nmm.boxes[:, 0] < 55)[0])
    assert nmm.boxes[k].tolist() == [10, 10, 50, 52] and nmm.labels[k] == 1


def test_nmm_chains_where_greedy_nmm_does_not():
    # A matches B, B matches C, A does not match C: NMM puts all three together, greedy NMM / NMS leave C alone.
    grid = TileGrid(200, 100, 256)
    tile = next(iter(grid))
    boxes = [[0.0, 0, 40, 40], [20, 0, 60, 40], [40, 0, 80, 40]]
    items = [(tile, boxes, [0.9, 0.8, 0.7], [0, 0, 0])]
    assert len(merge_detections(grid, items, method="nmm", match="iou", threshold=0.3)) == 1
    for method in ("greedy_nmm", "nms"):
        assert len(merge_detections(grid, items, method=method, match="iou", threshold=0.3)) == 2


# ---- 3. streaming: bounded memory ------------------------------------------------------------------------


def test_streaming_holds_about_two_tile_rows():
    grid = TileGrid(200, 40 * 48 + 16, 64, 16)  # 40 rows, 4 columns
    assert grid.shape == (40, 4)
    truth, labels = plant(grid, seed=3)
    batches: list[tuple[int, int]] = []
    merger_ref: list[DetectionMerger] = []

    def sink(d: Detections) -> None:
        assert len(d) > 0
        batches.append((len(d), merger_ref[0].added))

    rng = np.random.default_rng(0)
    per_row = np.zeros(grid.shape[0], int)
    merger = DetectionMerger(grid, sink)
    merger_ref.append(merger)
    total = []
    for tile in grid:
        boxes, scores, labs, _ = detect(grid, tile, truth, labels, rng)
        per_row[tile.row] += len(boxes)
        merger.add(tile, boxes, scores, labs)
        total.append(len(boxes))
    merger.finish()
    two_rows = (per_row[:-1] + per_row[1:]).max()
    assert merger.max_held <= two_rows, (merger.max_held, two_rows)
    assert merger.max_held < sum(total) / 10
    assert len(batches) >= 30 and batches[0][1] < sum(total) / 10  # emitted as rows complete
    assert sum(n for n, _ in batches) == merger.emitted


def test_streamed_tall_scene_is_exact():
    grid = TileGrid(150, 30 * 48 + 16, 64, 16)
    truth, labels = plant(grid, seed=5)
    collected: list[Detections] = []
    result, _, items = run(grid, truth, labels, seed=1, sink=collected.append)
    assert len(result) == 0  # they went to the sink
    streamed = Detections.concatenate(collected)
    assert [len(h) for h in assign(streamed, truth)] == [1] * len(truth)
    assert_same(streamed, reference(grid, items, "nmm", "ios"))


# ---- 4. degenerate input ---------------------------------------------------------------------------------


def test_boxes_in_the_padding_of_a_tile_larger_than_the_image_are_dropped():
    """A 120 x 90 image in a 128 tile: the model sees 8 and 38 pixels of padding, and may find things there."""
    grid = TileGrid(120, 90, 128, 16)
    (tile,) = list(grid)
    boxes = [[10.0, 10, 30, 30], [30, 100, 50, 126], [121, 5, 127, 20], [100, 80, 125, 100]]
    res = merge_detections(grid, [(tile, boxes, [0.9, 0.8, 0.7, 0.6], [0, 1, 1, 0])])
    # the first is in the image, the next two lie wholly in the padding, the last is cut at the image's corner
    assert sorted(res.boxes.tolist()) == [[10.0, 10.0, 30.0, 30.0], [100.0, 80.0, 120.0, 90.0]]


def test_empty_tiles_and_empty_grid():
    grid = TileGrid(200, 150, 64, 16)
    calls = []
    merger = DetectionMerger(grid, calls.append)
    for i, tile in enumerate(grid):
        if i % 2:
            merger.skip(tile)
        else:
            merger.add(tile, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))
    assert len(merger.finish()) == 0 and calls == [] and merger.max_held == 0
    # zero-detection tiles (any empty array shape) next to tiles with detections
    tiles = list(grid)
    res = merge_detections(grid, [(tiles[0], [], [], []), (tiles[1], [[60.0, 5, 70, 15]], [0.5], [2], [77])])
    assert len(res) == 1 and res.best.tolist() == [77] and res.members.tolist() == [77]
    assert res.boxes.dtype == np.float64 and res.labels.dtype == np.int64 and res.offsets.tolist() == [0, 1]


def test_boxes_on_the_image_edge():
    grid = TileGrid(150, 100, 64, 16)  # last column at 86..150, last row at 36..100
    last = list(grid)[-1]
    box = [[120.0, 70, 150, 100]]  # touches the right and bottom image borders: not a partial view
    res = merge_detections(grid, [(last, box, [0.7], [0])], method="nms", edge_weight=0.1)
    assert res.boxes.tolist() == box and not res.partial[0]
    first = next(iter(grid))
    res = merge_detections(grid, [(first, [[0.0, 0, 10, 64]], [0.7], [0])])
    assert res.partial[0]  # touches the bottom side of tile 0, which is inside the image
    # an image smaller than the tile: the window is cut at the image border
    small = TileGrid(40, 30, 64)
    res = merge_detections(small, [(next(iter(small)), [[0.0, 0, 40, 30], [0, 0, 40.5, 30.2]], [0.9, 0.8], [0, 0])])
    assert res.boxes.tolist() == [[0, 0, 40, 30]] and not res.partial[0]  # clipped to the image, then merged


def test_zero_area_boxes_pass_through_unmatched():
    grid = TileGrid(100, 100, 128)
    res = merge_detections(grid, [(next(iter(grid)), [[5.0, 5, 5, 20], [5, 5, 5, 20]], [0.5, 0.4], [0, 0])])
    assert len(res) == 2


def test_scale_maps_grid_pixels_to_image_units():
    grid = TileGrid(333, 250, 64, 24)
    truth, labels = plant(grid, seed=1)
    base, _, items = run(grid, truth, labels)
    scaled = merge_detections(grid, [(t, b * 4, s, lab, i) for t, b, s, lab, i in items], scale=4.0, edge_margin=8.0)
    assert_same(scaled, {k: (v[0] * 4, *v[1:]) for k, v in as_dict(base).items()})


# ---- 5. bad input ------------------------------------------------------------------------------------------


def test_bad_configuration_names_the_choices():
    grid = TileGrid(100, 100, 64)
    with pytest.raises(ConfigError, match="nms, nmm, greedy_nmm"):
        DetectionMerger(grid, method="soft_nms")
    with pytest.raises(ConfigError, match="iou, ios"):
        DetectionMerger(grid, match="giou")
    for kw in ({"threshold": 1.5}, {"edge_margin": -1}, {"edge_weight": 0}, {"scale": 0}, {"threshold": np.nan}):
        with pytest.raises(ConfigError):
            DetectionMerger(grid, **kw)


@pytest.mark.parametrize(
    "boxes,scores,labels,ids,message",
    [
        ([[1.0, 2, 3]], [0.5], [0], None, "N x 4"),
        ([[1.0, 2, 3, 4]], [0.5, 0.6], [0], None, "expected 1 scores"),
        ([[1.0, 2, 3, 4]], [0.5], [0, 1], None, "expected 1 labels"),
        ([[1.0, 2, 3, 4]], [0.5], [0.0], None, "labels must be integers"),
        ([[1.0, 2, 3, 4]], [0.5], [0], [1, 2], "expected 1 ids"),
        ([[1.0, np.nan, 3, 4]], [0.5], [0], None, "not finite"),
        ([[5.0, 2, 3, 4]], [0.5], [0], None, "x1 < x0"),
        ([[1.0, 2, 3, 4]], [np.nan], [0], None, "finite and >= 0"),
        ([[1.0, 2, 3, 4]], [-1.0], [0], None, "finite and >= 0"),
        ([[1.0, 2, 3, 4]], [0.5], [0], None, "image coordinates"),  # tile-local coordinates on tile (1, 1)
    ],
)
def test_bad_detections_raise_invalid_region(boxes, scores, labels, ids, message):
    grid = TileGrid(300, 300, 64, 16)
    tile = list(grid)[grid.shape[1] + 1]  # row 1, col 1 at (48, 48)
    merger = DetectionMerger(grid)
    with pytest.raises(InvalidRegionError, match=message):
        merger.add(tile, np.array(boxes), np.array(scores), np.array(labels), None if ids is None else np.array(ids))


def test_wrong_tiles_and_missing_tiles():
    grid = TileGrid(300, 300, 64, 16)
    merger = DetectionMerger(grid)
    tile = next(iter(grid))
    merger.skip(tile)
    with pytest.raises(InvalidRegionError, match="already added"):
        merger.add(tile, [], [], [])
    other = next(iter(TileGrid(300, 300, 32)))
    with pytest.raises(InvalidRegionError, match="not a tile of this"):
        merger.add(other, [], [], [])
    merger.add(list(grid)[1], [[60.0, 5, 70, 15]], [0.5], [2])
    with pytest.raises(InvalidRegionError, match="neither added nor skipped"):
        merger.finish()
    assert merger.emitted == 0  # nothing emitted on that error
    assert len(merger.finish(allow_missing=True)) == 1


# ---- 6. the pair search and the cost -----------------------------------------------------------------------


def test_tree_pair_search_equals_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (400, 2))
    a = np.concatenate([xy, xy + rng.uniform(0, 30, (400, 2))], axis=1)
    xy = rng.uniform(0, 500, (300, 2))
    b = np.concatenate([xy, xy + rng.exponential(10, (300, 2))], axis=1)
    a[:3] = [[0, 0, 500, 500], [10, 10, 10, 300], [250, 250, 250.5, 250.5]]  # huge, zero width, tiny
    i, j = intersecting_pairs(a, b)  # 400 x 300 > the brute-force limit: the STRtree
    expected = set(zip(*(k.tolist() for k in np.nonzero(pairwise(a, b, "iou") > 0)), strict=True))
    got = list(zip(i.tolist(), j.tolist(), strict=True))
    assert len(got) == len(set(got)) and set(got) == expected and len(expected) > 500


def test_tree_pair_search_leaves_out_boxes_that_only_touch():
    """Half-open pixel edges: a lattice of 10-px squares touches its neighbours along sides and at corners but
    intersects none of them; squares shifted by 5 px overlap four each (two at the lattice's right edge). ``a`` is
    ``b``'s first rows, as the merger calls it."""
    xy = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2) * 10.0
    lattice = np.concatenate([xy, xy + 10], axis=1)  # 400 squares, rows of 20
    b = np.concatenate([lattice, lattice[:50] + 5])
    i, j = intersecting_pairs(lattice, b)  # 400 x 450 > the brute-force limit: the STRtree
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    assert {(p, q) for p, q in got if q < 400} == {(k, k) for k in range(400)}
    assert len([q for _, q in got if q >= 400]) == 50 * 4 - 2 * 2  # squares 19 and 39 stick out on the right
    assert len(got) == len(i)


def twenty_thousand_boxes():
    """A 60 x 60 grid of 128-px tiles, 9216 planted boxes and their ~20k per-tile detections (also timed by
    benchmarks/merge_bench.py)."""
    grid = TileGrid(59 * 96 + 128, 59 * 96 + 128, 128, 32)
    rng = np.random.default_rng(0)
    cells = np.stack(np.meshgrid(np.arange(96), np.arange(96)), -1).reshape(-1, 2) * 60.0
    wh = rng.uniform(8, 28, (len(cells), 2))
    xy = cells + rng.uniform(0, 60 - wh - 2)
    truth = np.concatenate([xy, xy + wh], axis=1)
    labels = rng.integers(0, 3, len(truth))
    by_row = {}
    order = np.argsort(truth[:, 1])
    for r, y in enumerate(grid.ys):
        k = order[(truth[order, 1] < y + 128) & (truth[order, 3] > y)]
        by_row[r] = k
    items = []
    for tile in grid:
        k = by_row[tile.row]
        boxes, scores, labs, _ = detect(grid, tile, truth[k], labels[k], rng)
        items.append((tile, boxes, scores, labs))
    return grid, truth, items


def test_twenty_thousand_boxes_over_a_60_by_60_grid_run_fast():
    grid, truth, items = twenty_thousand_boxes()
    assert grid.shape == (60, 60)
    n = sum(len(it[1]) for it in items)
    start = time.perf_counter()
    merger = DetectionMerger(grid)
    for it in items:
        merger.add(*it)
    result = merger.finish()
    elapsed = time.perf_counter() - start
    print(f"\nmerged {n} boxes over {len(grid)} tiles into {len(result)} objects in {elapsed:.2f} s")
    assert n > 18_000 and len(result) == len(truth)
    assert [len(h) for h in assign(result, truth[:300])] == [1] * 300
    assert merger.max_held < n / 20
