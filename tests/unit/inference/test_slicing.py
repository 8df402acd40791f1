"""Sliced inference: tile geometry, border handling, NMS and weighted box fusion on hand-built
boxes, and the detections of a stand-in detector on tiles, with the recall that slicing wins
on a large image of small objects."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

import detr_lightning as dl
from detr_lightning.inference import Predictor
from detr_lightning.inference.slicing import (
    SliceSettings,
    merge_detections,
    predict_sliced,
    tile_origins,
    tile_windows,
    touches_inner_border,
    weighted_box_fusion,
)
from helpers.squares import SquareDetector, recall_and_precision, square_scene


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def assert_boxes(actual: torch.Tensor, expected: list[list[float]], atol: float = 1e-4) -> None:
    """xyxy boxes in pixels; 1e-4: float32 rounding of the relative cxcywh boxes."""
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0
    )


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    ("length", "tile", "overlap", "origins"),
    [
        (1000, 640, 0.2, [0, 360]),  # stride 640 - 128 = 512; the last tile ends at 1000
        (2000, 640, 0.2, [0, 512, 1024, 1360]),
        (1152, 640, 0.2, [0, 512]),  # 512 + 640 = 1152: the regular tile is the last
        (1153, 640, 0.2, [0, 512, 513]),
        (640, 640, 0.2, [0]),
        (500, 640, 0.2, [0]),  # shorter than a tile: one tile of 500
        (1280, 640, 0.0, [0, 640]),
        (250, 100, 0.25, [0, 75, 150]),
        (33, 32, 0.99, [0, 1]),  # overlap 31.68 -> 32, at most 31: stride 1
        # 0.29 * 100 = 28.999999999999996 rounds to 29: stride 71
        (1000, 100, 0.29, [0, 71, 142, 213, 284, 355, 426, 497, 568, 639, 710, 781, 852, 900]),
    ],
)
def test_tile_origins_by_hand(length, tile, overlap, origins):
    assert tile_origins(length, tile, overlap) == origins


@pytest.mark.parametrize("length", [32, 100, 333, 640, 641, 1000, 1919, 4000])
@pytest.mark.parametrize(("tile", "overlap"), [(32, 0.0), (100, 0.5), (256, 0.2), (640, 0.75)])
def test_tiles_cover_each_axis_with_the_overlap(length, tile, overlap):
    origins = tile_origins(length, tile, overlap)
    side = min(tile, length)
    assert origins[0] == 0 and origins[-1] + side == length  # the last ends at the border
    steps = [b - a for a, b in pairwise(origins)]
    stride = side - round(overlap * side)
    assert all(0 < step <= stride for step in steps)  # neighbours share >= the overlap
    assert all(step == stride for step in steps[:-1])  # only the last is shifted
    if len(origins) > 1:
        assert origins[-2] + side < length  # no tile more than needed


def test_tile_windows_by_hand_and_full_coverage():
    windows = tile_windows(200, 300, 100, 0.2)  # rows 0, 80, 100; columns 0, 80, 160, 200
    assert windows[:5] == [
        (0, 0, 100, 100), (80, 0, 180, 100), (160, 0, 260, 100), (200, 0, 300, 100),
        (0, 80, 100, 180),
    ]  # fmt: skip
    assert len(windows) == 12 and windows[-1] == (200, 100, 300, 200)
    covered = torch.zeros(200, 300, dtype=torch.int64)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() == 1 and covered.max() == 4
    assert covered[90, 90] == 4 and covered[90, 150] == 2  # overlaps counted by hand
    # (height, width) tiles, and an image smaller than a tile
    assert tile_windows(200, 300, (50, 300), 0.0) == [
        (0, y, 300, y + 50) for y in range(0, 200, 50)
    ]
    assert tile_windows(20, 30, 640, 0.2) == [(0, 0, 30, 20)]


def test_settings_errors_name_the_key():
    assert SliceSettings(size=[48, 64]).tile_size == (48, 64)
    assert SliceSettings(size=96).tile_size == (96, 96)
    bad = [
        ({"size": 16}, "size=16"),
        ({"size": (32, 31)}, r"size=\(32, 31\)"),
        ({"size": True}, "size=True"),
        ({"size": 64.0}, "size=64.0"),
        ({"overlap": 1.0}, r"overlap=1.0: .*\[0, 1\)"),
        ({"overlap": -0.1}, "overlap=-0.1"),
        ({"merge": "mean"}, "merge='mean': choose one of nms, wbf"),
        ({"iou_threshold": 1.5}, "iou_threshold=1.5"),
        ({"whole_image": "yes"}, "whole_image='yes'"),
        ({"partial_margin": -1}, "partial_margin=-1"),
    ]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            SliceSettings(**settings)


def test_touches_inner_border():
    window, size = (100, 50, 200, 150), (300, 400)  # all four edges inside the image
    boxes = torch.tensor(
        [
            [120.0, 70, 180, 130],  # 20 pixels from every edge
            [100, 70, 150, 130],  # on the left edge
            [120, 70, 197, 130],  # 3 pixels from the right edge
            [120, 48, 180, 130],  # across the top edge
            [120, 70, 180, 149],  # 1 pixel from the bottom edge
        ]
    )
    assert touches_inner_border(boxes, window, size, 4.0).tolist() == [0, 1, 1, 1, 1]
    assert touches_inner_border(boxes, window, size, 2.0).tolist() == [0, 1, 0, 1, 1]
    # edges on the image border never count
    corner = torch.tensor([[0.0, 0, 100, 100], [0, 0, 50, 50], [0, 0, 99, 50]])
    assert touches_inner_border(corner, (0, 0, 100, 100), (100, 100), 4.0).tolist() == [0, 0, 0]
    assert touches_inner_border(corner, (0, 0, 100, 100), (200, 200), 4.0).tolist() == [1, 0, 1]


# ------------------------------------------------------------------------------- merge
def detections(boxes, scores, labels) -> dict:
    count = len(scores)
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32),
        "scores": torch.as_tensor(scores),
        "labels": torch.as_tensor(labels),
        "names": [f"n{i}" for i in range(count)],
        "category_ids": torch.as_tensor(labels) + 10,
        "queries": torch.arange(count) + 100,
    }


def test_nms_merge_is_class_wise():
    merged = merge_detections(
        detections(
            [[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [5, 0, 15, 10]],
            [0.9, 0.6, 0.7, 0.8],
            [0, 0, 1, 0],
        )
    )
    # box 1 overlaps box 0 at IoU 81 / 119 = 0.68: dropped; box 2 is of another class; box 3
    # overlaps box 0 at 50 / 150 = 0.33
    assert merged["queries"].tolist() == [100, 103, 102]
    assert merged["names"] == ["n0", "n3", "n2"] and merged["category_ids"].tolist() == [10, 10, 11]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert merged["boxes"][1].tolist() == [5, 0, 15, 10]
    strict = merge_detections(merged, "nms", iou_threshold=0.3)
    assert strict["queries"].tolist() == [100, 102]
    with pytest.raises(ValueError, match="merge='soft'"):
        merge_detections(merged, "soft")


def test_weighted_box_fusion_by_hand():
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10], [0, 0, 10, 10], [30, 30, 40, 40]]
    )
    scores = torch.tensor([0.9, 0.9, 0.5, 0.8, 0.95])
    labels = torch.tensor([0, 0, 0, 1, 0])
    fused, fused_scores, best = weighted_box_fusion(boxes, scores, labels, 0.5)
    # box 1 joins box 0 (IoU 80 / 120 = 0.67): their mean [1, 0, 11, 10]; box 2 overlaps box 0
    # at 60 / 140 = 0.43 only, but the fused box at 70 / 130 = 0.54: it joins, and the cluster
    # becomes (0.9 * 0 + 0.9 * 2 + 0.5 * 4) / 2.3 = 3.8 / 2.3 ... (0.9 * 10 + 0.9 * 12 + 0.5 *
    # 14) / 2.3 = 26.8 / 2.3 in x; box 3 is of class 1, box 4 far away
    assert best.tolist() == [4, 0, 3]
    torch.testing.assert_close(fused_scores, torch.tensor([0.95, 0.9, 0.8]))
    expected = [[30, 30, 40, 40], [3.8 / 2.3, 0, 26.8 / 2.3, 10], [0, 0, 10, 10]]
    torch.testing.assert_close(fused, torch.tensor(expected))
    merged = merge_detections(detections(boxes, scores, labels), "wbf", 0.5)
    assert merged["queries"].tolist() == [104, 100, 103] and merged["names"] == ["n4", "n0", "n3"]
    torch.testing.assert_close(merged["boxes"], fused)
    # at a threshold above 0.67 nothing fuses
    assert len(weighted_box_fusion(boxes, scores, labels, 0.7)[0]) == 5


# ------------------------------------------------------------- a stand-in detector on tiles
def two_squares() -> torch.Tensor:
    """A dark 200 x 300 image with white squares at (130, 30, 150, 50) and (86, 120, 116,
    150), xyxy."""
    image = torch.full((3, 200, 300), 20, dtype=torch.uint8)
    image[:, 30:50, 130:150] = 255
    image[:, 120:150, 86:116] = 255
    return image


@pytest.fixture
def predictor() -> Predictor:
    """Blobs of at least 12 model-input pixels; images to a short side of 100: the 200 x 300
    image halves, 100-pixel tiles keep their pixels."""
    return Predictor(SquareDetector(min_side=12), preprocessing={"val_size": 100, "max_size": 999})


def test_tiles_find_what_the_whole_image_misses(predictor):
    image = two_squares()
    (whole,) = predictor.predict(image, threshold=0.5)
    # halved, the 20-pixel square is 10 pixels: missed; the 30-pixel one (15 pixels) is found
    assert len(whole["scores"]) == 1
    assert_boxes(whole["boxes"], [[86, 120, 116, 150]], atol=2.0)

    slicing = SliceSettings(size=100, overlap=0.2)  # 12 tiles of 100 pixels (see above)
    (sliced,) = predict_sliced(predictor, image, slicing, threshold=0.5)
    # tile boxes moved to the image: exact, as the tiles run at their own pixels; the large
    # square (two full tiles and the whole image) once, scored by its 30 pixels, then the
    # small one
    assert_boxes(sliced["boxes"], [[86, 120, 116, 150], [130, 30, 150, 50]])
    assert sliced["scores"].tolist() == pytest.approx([sigmoid(30 / 4), sigmoid(20 / 4)])
    assert sliced["names"] == ["class_0", "class_0"] and sliced["labels"].tolist() == [0, 0]
    assert set(sliced) == set(whole)

    # the tiles at x 0..100 cut the large square at 86..100 (14 pixels, found): dropped by
    # default; kept, it overlaps the whole square at IoU 14 / 30 < 0.5 and stays
    kept = predict_sliced(
        predictor, image, SliceSettings(size=100, drop_partial=False), threshold=0.5
    )[0]
    assert_boxes(kept["boxes"], [[86, 120, 116, 150], [130, 30, 150, 50], [86, 120, 100, 150]])
    assert kept["scores"][2].item() == pytest.approx(sigmoid(14 / 4))

    tiles_only = SliceSettings(size=100, whole_image=False)
    for merge in ("nms", "wbf"):
        settings = SliceSettings(size=100, whole_image=False, merge=merge)
        (result,) = predict_sliced(predictor, image, settings, threshold=0.5)
        assert torch.equal(result["boxes"], sliced["boxes"])
    (top,) = predict_sliced(predictor, image, tiles_only, threshold=0.5, top_k=1)
    assert_boxes(top["boxes"], [[86, 120, 116, 150]])


def test_tiles_share_forward_passes(predictor):
    image = two_squares()
    model = predictor.model
    (single,) = predict_sliced(predictor, image, SliceSettings(size=100), threshold=0.5)
    assert sorted(model.calls) == [(1, 3, 100, 100)] * 12 + [(1, 3, 100, 150)]
    model.calls.clear()
    (batched,) = predict_sliced(
        predictor, image, SliceSettings(size=100), threshold=0.5, batch_size=4
    )
    assert sorted(model.calls) == [(1, 3, 100, 150)] + [(4, 3, 100, 100)] * 3
    for key in ("boxes", "scores", "labels", "queries"):
        assert torch.equal(batched[key], single[key])


def test_an_image_within_one_tile_runs_once(predictor):
    image = two_squares()[:, 100:180, 60:150]  # 80 x 90: the large square at (26, 20, 56, 50)
    model = predictor.model
    results = predict_sliced(predictor, torch.stack([image, image]), SliceSettings(size=100))
    assert len(model.calls) == 2 and len(results) == 2
    (expected,) = predictor.predict(image)
    for result in results:
        assert torch.equal(result["boxes"], expected["boxes"])
        assert_boxes(result["boxes"], [[26, 20, 56, 50]], atol=1.0)  # enlarged x1.25


def test_slicing_recalls_the_small_objects_of_a_large_image():
    """1280 x 1280 pixels, 48 squares of 16 pixels and 4 of 48: the whole image shrinks x0.25
    (squares of 4 pixels, under the detector's 12), 256-pixel tiles grow x1.25 (20 pixels)."""
    image, truth = square_scene(1280, 1280, [16] * 48 + [48] * 4, cell=80, seed=1)
    predictor = Predictor(
        SquareDetector(min_side=12), preprocessing={"val_size": 320, "max_size": 533}
    )
    (whole,) = predictor.predict(image, threshold=0.5)
    whole_recall, _ = recall_and_precision(whole["boxes"], whole["scores"], truth)
    slicing = SliceSettings(size=256, overlap=0.25)  # 7 x 7 tiles, 64 pixels shared
    (sliced,) = predict_sliced(predictor, image, slicing, threshold=0.5, batch_size=8)
    recall, precision = recall_and_precision(sliced["boxes"], sliced["scores"], truth)
    assert whole_recall <= 0.3
    assert recall >= 0.9 and precision == 1.0  # each square once: tile duplicates merged
    # kept, the pieces of squares that tile borders cut are extra detections
    keep_cut = SliceSettings(size=256, overlap=0.25, drop_partial=False)
    (with_cut,) = predict_sliced(predictor, image, keep_cut, threshold=0.5, batch_size=8)
    assert len(with_cut["scores"]) > len(truth)


def test_exported_from_the_package():
    assert dl.predict_sliced is predict_sliced and dl.SliceSettings is SliceSettings
