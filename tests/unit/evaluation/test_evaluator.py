"""COCO evaluation against pycocotools' COCOeval: the statistics, unreadable images, maxDets,
unused labels and the backends."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_lightning.data.labels import LabelMap
from detr_lightning.evaluation.evaluator import (
    COCO_METRIC_KEYS,
    CocoEvaluator,
    coco_eval_file,
    metric_keys,
)
from detr_lightning.evaluation.report import report
from helpers.data import make_tiny_synthetic


def reference_stats(annotation_file: Path, results: list[dict], max_dets=(1, 10, 100), cats=None):
    """pycocotools' COCOeval on a results list, independently of our code."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        detections = ground_truth.loadRes(results)
        evaluator = COCOeval(ground_truth, detections, "bbox")
        evaluator.params.maxDets = list(max_dets)
        if cats is not None:
            evaluator.params.catIds = cats
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, dict, LabelMap]:
    root = make_tiny_synthetic(tmp_path_factory.mktemp("coco"), num_val=8, max_objects=4)
    annotation_file = root / "annotations" / "instances_val2017.json"
    data = json.loads(annotation_file.read_text())
    return annotation_file, data, LabelMap.from_coco(data)


def fake_detections(data: dict, label_map: LabelMap, per_image: int, seed: int):
    """Per image: jittered ground-truth boxes plus random false positives, as model outputs
    (xyxy pixels, scores, contiguous labels), with targets holding the image ids."""
    generator = torch.Generator().manual_seed(seed)
    targets, detections = [], []
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        boxes = [a["bbox"] for a in anns]
        labels = [label_map.category_to_label(a["category_id"]) for a in anns]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes]).reshape(-1, 4)
        xyxy = xyxy + torch.randn(xyxy.shape, generator=generator) * 3
        extra = per_image - len(boxes)
        corner = torch.rand(extra, 2, generator=generator) * 40
        size = torch.rand(extra, 2, generator=generator) * 40 + 5
        xyxy = torch.cat([xyxy, torch.cat([corner, corner + size], 1)])
        labels = torch.tensor(
            labels + torch.randint(label_map.num_classes, (extra,), generator=generator).tolist()
        )
        # true detections score higher on the whole, with overlap: AP well inside (0, 1)
        scores = torch.rand(per_image, generator=generator) * 0.7
        scores[: len(boxes)] += 0.3
        targets.append({"image_id": image["id"], "stand_in_for": -1})
        detections.append({"boxes": xyxy, "scores": scores, "labels": labels})
    return targets, detections


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_statistics_and_results_equal_pycocotools(split, tmp_path, backend, caplog, capsys):
    annotation_file, data, label_map = split
    caplog.set_level(logging.INFO)  # as train.py and eval.py run: the backends stay quiet
    targets, detections = fake_detections(data, label_map, per_image=20, seed=0)
    evaluator = CocoEvaluator(annotation_file, label_map.category_ids, backend=backend)
    # in two batches, with the distributed sampler's repeat of the first image at the end
    evaluator.update(targets[:3], detections[:3])
    evaluator.update(targets[3:] + targets[:1], detections[3:] + detections[:1])
    result = evaluator.compute(tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 20 * len(data["images"])  # the repeat is counted once
    reference = reference_stats(annotation_file, results)
    # faster_coco_eval sums in another order: the same statistics up to the last bit
    exact = reference
    if backend != "pycocotools":
        exact = pytest.approx(reference, rel=1e-14, abs=1e-15)
    assert [result.stats[k] for k in COCO_METRIC_KEYS] == exact
    assert coco_eval_file(annotation_file, tmp_path / "results.json") == reference
    assert 0.1 < reference[0] < 0.9, reference  # neither trivially 0 nor 1
    # the backend's own table neither printed nor logged (the caller reports the statistics)
    assert not [r for r in caplog.records if r.name.startswith(("faster_coco_eval", "pycoco"))]
    assert "Average Precision" not in capsys.readouterr().out
    assert result.num_images == len(data["images"]) and result.skipped_images == []
    # per-class AP equals COCOeval restricted to that category
    for category, ap in result.per_class.items():
        assert ap == pytest.approx(reference_stats(annotation_file, results, cats=[category])[0])


def test_unreadable_image_counts_its_objects_as_missed(split, tmp_path):
    annotation_file, data, label_map = split
    targets, detections = fake_detections(data, label_map, per_image=10, seed=1)
    victim = next(t["image_id"] for t in targets if any(a["image_id"] == t["image_id"]
                                                         for a in data["annotations"]))  # fmt: skip
    # the stand-in is another image's sample; its detections must not count for anyone
    stand_in = {"image_id": targets[0]["image_id"], "stand_in_for": victim}
    kept = [(t, d) for t, d in zip(targets, detections) if t["image_id"] != victim]
    # pycocotools itself, so that the statistics must be equal to the last bit
    evaluator = CocoEvaluator(annotation_file, label_map.category_ids, backend="pycocotools")
    evaluator.update([stand_in] + [t for t, _ in kept], [detections[0]] + [d for _, d in kept])
    result = evaluator.compute(tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert victim not in {r["image_id"] for r in results}
    assert result.skipped_images == [victim] and result.num_images == len(data["images"])
    # pycocotools over all images, the unreadable one without detections: its GT is missed
    assert [result.stats[k] for k in COCO_METRIC_KEYS] == reference_stats(annotation_file, results)
    assert result.metrics()["skipped_images"] == 1.0


def test_max_dets_follows_the_number_of_queries(split, tmp_path):
    annotation_file, data, label_map = split
    targets, detections = fake_detections(data, label_map, per_image=150, seed=2)
    evaluator = CocoEvaluator(
        annotation_file, label_map.category_ids, max_dets=150, backend="pycocotools"
    )
    evaluator.update(targets, detections)
    result = evaluator.compute(tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(result.stats) == set(metric_keys(150)) and "mar_150" in result.stats
    reference = reference_stats(annotation_file, results, max_dets=(1, 10, 150))
    assert [result.stats[k] for k in metric_keys(150)] == reference
    # pycocotools' summarize looks the first AP up at maxDets=100, absent here: -1.
    # faster_coco_eval takes the last maxDets for it, as for the other eleven statistics.
    assert reference[0] == -1.0
    fast = CocoEvaluator(
        annotation_file, label_map.category_ids, max_dets=150, backend="faster_coco_eval"
    )
    fast.update(targets, detections)
    fast_stats = [fast.compute().stats[k] for k in metric_keys(150)]
    assert 0.0 < fast_stats[0] < 1.0
    assert fast_stats[1:] == pytest.approx(reference[1:], rel=1e-14, abs=1e-15)
    assert reference != reference_stats(annotation_file, results)  # 100 would differ
    assert "maxDets=150" in report(result.metrics(), label_map.to_dict())


def test_unused_labels_and_no_detections(split, tmp_path):
    annotation_file, data, label_map = split
    targets, detections = fake_detections(data, label_map, per_image=5, seed=3)
    padded = label_map.padded(label_map.num_classes + 2)  # two labels with no category
    for det in detections:
        det["labels"][:] = label_map.num_classes + 1
    evaluator = CocoEvaluator(annotation_file, padded.category_ids)
    evaluator.update(targets, detections)
    result = evaluator.compute(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == []
    assert result.stats["map"] == 0.0 and result.stats["mar_100"] == 0.0


def test_auto_backend_is_faster_coco_eval_when_installed(split, monkeypatch):
    import importlib.util

    from detr_lightning import evaluation

    annotation_file, _, label_map = split
    assert CocoEvaluator(annotation_file, label_map.category_ids).backend == "faster_coco_eval"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        evaluation.evaluator.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "faster_coco_eval" else real_find_spec(name, *a),
    )
    assert CocoEvaluator(annotation_file, label_map.category_ids).backend == "pycocotools"


def test_unknown_backend_fails_at_set_up(split):
    annotation_file, _, label_map = split
    with pytest.raises(ValueError, match="eval_backend must be one of"):
        CocoEvaluator(annotation_file, label_map.category_ids, backend="nope")
