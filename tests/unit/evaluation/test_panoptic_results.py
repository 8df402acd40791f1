"""Panoptic results files: the PNG + JSON that the PQ computations read, ids from 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lightning.data.panoptic import id_to_rgb, rgb_to_id
from detr_lightning.evaluation.panoptic_quality import pq_from_files
from detr_lightning.evaluation.panoptic_results import (
    read_panoptic_results,
    write_panoptic_results,
)
from detr_lightning.models.panoptic_postprocess import PanopticSegmentation

CATEGORIES = [{"id": 1, "name": "cat", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0}]


def _ground_truth(root):
    """Two 4 x 5 images: sky on top, a cat below left, VOID elsewhere."""
    gt = np.array([[5] * 5, [5] * 5, [9, 9, 0, 0, 0], [9, 9, 0, 0, 0]])
    (root / "gt").mkdir()
    annotations = []
    for image_id in (1, 2):
        Image.fromarray(id_to_rgb(gt)).save(root / "gt" / f"{image_id:04d}.png")
        annotations.append({"image_id": image_id, "file_name": f"{image_id:04d}.png",
                            "segments_info": [
                                {"id": 5, "category_id": 7, "iscrowd": 0, "area": 10},
                                {"id": 9, "category_id": 1, "iscrowd": 0, "area": 4}]})  # fmt: skip
    (root / "gt.json").write_text(json.dumps({"annotations": annotations,
                                              "categories": CATEGORIES}))  # fmt: skip
    return gt


def test_written_results_read_back_and_score(tmp_path):
    gt = _ground_truth(tmp_path)
    # the post-processing's ids are 0, 1, ...: 0 is the sky here; label indices 0 (cat) and
    # 1 (sky) map to the dataset's category ids 1 and 7
    segment_map = torch.from_numpy(np.where(gt == 5, 0, np.where(gt == 9, 1, 0)))
    segment_map[2:, 2:] = 0  # the VOID pixels predicted as sky (not counted against it)
    perfect = PanopticSegmentation(segment_map, [
        {"id": 0, "category_id": 1, "isthing": False, "area": 16},
        {"id": 1, "category_id": 0, "isthing": True, "area": 4}])  # fmt: skip
    empty = PanopticSegmentation(torch.zeros(4, 5, dtype=torch.long), [])
    folder = write_panoptic_results(
        [(1, "0001.jpg", perfect), (2, "0002.jpg", empty)], tmp_path / "pred.json",
        category_id={0: 1, 1: 7},
    )  # fmt: skip
    written = read_panoptic_results(tmp_path / "pred.json")
    assert written[1]["file_name"] == "0001.png"
    assert written[1]["segments_info"] == [
        {"id": 1, "category_id": 7, "isthing": 0, "area": 16, "bbox": [0, 0, 5, 4]},
        {"id": 2, "category_id": 1, "isthing": 1, "area": 4, "bbox": [0, 2, 2, 2]},
    ]
    assert written[2]["segments_info"] == []
    ids = rgb_to_id(np.asarray(Image.open(folder / "0001.png")))
    assert ids.tolist() == [[1] * 5, [1] * 5, [2, 2, 1, 1, 1], [2, 2, 1, 1, 1]]
    assert not rgb_to_id(np.asarray(Image.open(folder / "0002.png"))).any()  # all VOID

    ours = pq_from_files(tmp_path / "gt.json", tmp_path / "pred.json", tmp_path / "gt", folder)
    # image 1 perfect (sky IoU 10 / (16 + 10 - 10 - 6) = 1); image 2: two misses
    # cat: PQ 1 / (1 + 0.5) ; sky: the same
    assert ours["all"]["pq"] == pytest.approx(2 / 3) and ours["all"]["sq"] == pytest.approx(1.0)
    evaluation = pytest.importorskip("panopticapi.evaluation")
    gt_data = json.loads((tmp_path / "gt.json").read_text())
    pred_data = json.loads((tmp_path / "pred.json").read_text())
    stat = evaluation.pq_compute_single_core(
        0, list(zip(gt_data["annotations"], pred_data["annotations"])), str(tmp_path / "gt"),
        str(folder), {c["id"]: c for c in CATEGORIES},
    )  # fmt: skip
    reference, _ = stat.pq_average({c["id"]: c for c in CATEGORIES}, isthing=None)
    assert reference["pq"] == pytest.approx(ours["all"]["pq"], abs=1e-12)
