"""PQ / SQ / RQ against panopticapi's own computation (panopticapi-lite, the COCO panoptic
API as packaged on PyPI) on generated images with crowd and VOID regions, and on a case
computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detr_lightning.data.panoptic import id_to_rgb, read_segment_ids, rgb_to_id
from detr_lightning.evaluation.panoptic_quality import (
    PanopticStats,
    image_counts,
    merge_stats,
    pq_from_files,
    summarize,
)

CATEGORIES = {
    1: {"id": 1, "name": "cat", "isthing": 1},
    2: {"id": 2, "name": "dog", "isthing": 1},
    3: {"id": 3, "name": "sky", "isthing": 0},
    4: {"id": 4, "name": "grass", "isthing": 0},
    5: {"id": 5, "name": "never", "isthing": 1},
}


def test_hand_computed_case():
    """A 4 x 6 image. Ground truth: sky (id 1) rows 0-1, a cat (id 2) at rows 2-3 cols 0-1,
    a crowd of dogs (id 3) rows 2-3 cols 4-5, VOID rows 2-3 cols 2-3."""
    gt = np.array([[1] * 6, [1] * 6, [2, 2, 0, 0, 3, 3], [2, 2, 0, 0, 3, 3]])
    gt_segments = [
        {"id": 1, "category_id": 3, "iscrowd": 0, "area": 12},
        {"id": 2, "category_id": 1, "iscrowd": 0, "area": 4},
        {"id": 3, "category_id": 2, "iscrowd": 1, "area": 4},
    ]
    # prediction: sky over rows 0-1 and the VOID block; the cat on 3 of its 4 pixels, the 4th
    # a one-pixel dog; a dog on the crowd region
    pred = np.array([[10] * 6, [10] * 6, [20, 20, 10, 10, 30, 30], [20, 40, 10, 10, 30, 30]])
    pred_segments = [
        {"id": 10, "category_id": 3},
        {"id": 20, "category_id": 1},
        {"id": 30, "category_id": 2},
        {"id": 40, "category_id": 2},
    ]
    counts = image_counts(gt, gt_segments, pred, pred_segments, CATEGORIES)
    # sky: TP with IoU 12 / (16 + 12 - 12 - 4) = 1
    assert counts[3].tp == 1 and counts[3].iou == pytest.approx(1.0)
    # cat: 3 px predicted, all on the cat: IoU 3 / (3 + 4 - 3) = 0.75 -> TP
    assert counts[1].tp == 1 and counts[1].iou == pytest.approx(0.75)
    # dog 30 lies on the dog crowd: ignored; dog 40 (1 px on the cat): a false positive
    assert counts[2].tp == 0 and counts[2].fp == 1 and counts[2].fn == 0
    result = summarize({c: counts[c] for c in counts}, {c: CATEGORIES[c] for c in (1, 2, 3)})
    # PQ: cat 0.75, dog 0 / (0 + 0.5) = 0, sky 1 -> mean 1.75 / 3
    assert result["all"]["pq"] == pytest.approx(1.75 / 3) and result["all"]["n"] == 3
    assert result["things"]["pq"] == pytest.approx(0.375) and result["things"]["n"] == 2
    assert result["stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert result["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def _random_image(rng, height=24, width=32):
    """Ground truth with things, stuff, VOID and crowd; a prediction that overlaps it with
    noise, including segments on VOID and on crowd regions."""
    gt = np.zeros((height, width), np.int64)
    segments, next_id = [], 1
    for category in (3, 4):  # stuff bands
        top = int(rng.integers(0, height - 6))
        gt[top : top + int(rng.integers(3, 8))] = next_id
        segments.append({"id": next_id, "category_id": category, "iscrowd": 0})
        next_id += 1
    for _ in range(int(rng.integers(2, 6))):  # things, some crowd
        y, x = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        h, w = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        gt[y : y + h, x : x + w] = next_id
        crowd = int(rng.random() < 0.25)
        segments.append({"id": next_id, "category_id": int(rng.integers(1, 3)), "iscrowd": crowd})
        next_id += 1
    gt[rng.random((height, width)) < 0.03] = 0  # scattered VOID
    segments = [s for s in segments if (gt == s["id"]).any()]
    for s in segments:
        s["area"] = int((gt == s["id"]).sum())

    pred = np.zeros_like(gt)
    pred_segments = []
    for index, s in enumerate(segments):
        region = gt == s["id"]
        grown = region.copy()
        shift = int(rng.integers(-2, 3))
        grown = np.roll(grown, shift, axis=int(rng.integers(0, 2)))
        label = 100 + index
        pred[grown] = label
        category = s["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 5))
        pred_segments.append({"id": label, "category_id": category})
    # a false positive, partly on VOID
    y, x = int(rng.integers(0, height - 5)), int(rng.integers(0, width - 5))
    pred[y : y + 4, x : x + 4] = 999
    pred_segments.append({"id": 999, "category_id": int(rng.integers(1, 5))})
    present = set(np.unique(pred).tolist())
    pred_segments = [s for s in pred_segments if s["id"] in present]
    return gt, segments, pred, pred_segments


def _write(folder, name, ids):
    folder.mkdir(exist_ok=True)
    Image.fromarray(id_to_rgb(ids)).save(folder / name)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    rng = np.random.default_rng(0)
    gt_annotations, pred_annotations = [], []
    for image_id in range(1, 13):
        gt, gt_segments, pred, pred_segments = _random_image(rng)
        name = f"{image_id:012d}.png"
        _write(root / "gt", name, gt)
        _write(root / "pred", name, pred)
        gt_annotations.append({"image_id": image_id, "file_name": name,
                               "segments_info": gt_segments})  # fmt: skip
        pred_annotations.append({"image_id": image_id, "file_name": name,
                                 "segments_info": pred_segments})  # fmt: skip
    categories = list(CATEGORIES.values())
    (root / "gt.json").write_text(json.dumps({"annotations": gt_annotations,
                                              "categories": categories}))  # fmt: skip
    (root / "pred.json").write_text(json.dumps({"annotations": pred_annotations}))
    return root


def test_equals_panopticapi(dataset):
    evaluation = pytest.importorskip("panopticapi.evaluation")  # `make install` installs it
    pq_compute_single_core = evaluation.pq_compute_single_core

    gt = json.loads((dataset / "gt.json").read_text())
    pred = json.loads((dataset / "pred.json").read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = list(zip(gt["annotations"], pred["annotations"]))
    stat = pq_compute_single_core(0, pairs, str(dataset / "gt"), str(dataset / "pred"), categories)
    ours = pq_from_files(dataset / "gt.json", dataset / "pred.json", dataset / "gt",
                         dataset / "pred")  # fmt: skip
    for name, isthing in (("all", None), ("things", True), ("stuff", False)):
        reference, per_class = stat.pq_average(categories, isthing=isthing)
        assert ours[name]["n"] == reference["n"]
        for key in ("pq", "sq", "rq"):
            assert ours[name][key] == pytest.approx(reference[key], abs=1e-12), (name, key)
        if isthing is None:
            assert set(ours["per_class"]) == set(per_class)
            for category, row in per_class.items():
                assert ours["per_class"][category] == pytest.approx(row, abs=1e-12)
    # the generated data exercises every case: matches, misses, false positives, crowd
    totals = {c: stat.pq_per_cat[c] for c in categories}
    assert sum(t.tp for t in totals.values()) >= 10
    assert sum(t.fp for t in totals.values()) >= 5 and sum(t.fn for t in totals.values()) >= 3
    assert 0.2 < ours["all"]["pq"] < 0.95
    crowds = [s for a in gt["annotations"] for s in a["segments_info"] if s["iscrowd"]]
    assert crowds  # crowd regions, and VOID pixels (the generator's 3%), are in the data


def test_processes_and_repeats_give_the_same_result(dataset):
    gt = json.loads((dataset / "gt.json").read_text())
    pred = {
        a["image_id"]: a for a in json.loads((dataset / "pred.json").read_text())["annotations"]
    }

    def stats_of(annotations):
        stats = PanopticStats()
        for a in annotations:
            p = pred[a["image_id"]]
            stats.add_image(a["image_id"], image_counts(
                read_segment_ids(dataset / "gt" / a["file_name"]), a["segments_info"],
                read_segment_ids(dataset / "pred" / p["file_name"]), p["segments_info"],
                CATEGORIES,
            ))  # fmt: skip
        return stats

    annotations = gt["annotations"]
    whole = summarize(stats_of(annotations).totals(), CATEGORIES)
    # two "ranks", interleaved, the second repeating an image as a padded sampler does
    parts = [stats_of(annotations[0::2]), stats_of(annotations[1::2] + annotations[:1])]
    merged = summarize(merge_stats(parts[::-1]).totals(), CATEGORIES)
    assert merged == whole


def test_bad_predictions_are_named(tmp_path):
    gt = np.array([[1, 1], [2, 2]])
    gt_segments = [{"id": 1, "category_id": 3, "iscrowd": 0, "area": 2},
                   {"id": 2, "category_id": 1, "iscrowd": 0, "area": 2}]  # fmt: skip
    pred = np.array([[5, 5], [6, 6]])
    with pytest.raises(ValueError, match="segment id 6 is in the prediction's PNG"):
        image_counts(gt, gt_segments, pred, [{"id": 5, "category_id": 3}], CATEGORIES)
    with pytest.raises(ValueError, match=r"\[7\] are in the prediction's segments_info"):
        image_counts(gt, gt_segments, pred, [{"id": 5, "category_id": 3},
                                             {"id": 6, "category_id": 1},
                                             {"id": 7, "category_id": 1}], CATEGORIES)  # fmt: skip
    with pytest.raises(ValueError, match="unknown category_id 42"):
        image_counts(gt, gt_segments, pred, [{"id": 5, "category_id": 42},
                                             {"id": 6, "category_id": 1}], CATEGORIES)  # fmt: skip
    with pytest.raises(ValueError, match="differ in size"):
        image_counts(gt, gt_segments, pred[:1], [], CATEGORIES)


def test_png_colours_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 65536 * 3 + 7]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    assert id_to_rgb(np.array([[256 * 2 + 1]])).tolist() == [[[1, 2, 0]]]
