"""The dataset check: every problem of a split reported with its id or file, statistics,
advice, and the summary line the data module logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from detr_lightning.cli.validate import format_report, main
from detr_lightning.data.annotations import scan_annotations
from detr_lightning.data.checks import ERROR, INFO, WARNING, Finding, annotation_findings
from detr_lightning.lightning import CocoDataModule
from detr_lightning.tools.dataset_check import DatasetReport, TrainingPlan, check_dataset
from helpers.data import CATEGORIES, write_broken, write_clean, write_coco


def check(root: Path, **kwargs) -> DatasetReport:
    """check_dataset of the COCO layout under ``root``."""
    train = (root / "train2017", root / "annotations" / "instances_train2017.json")
    val = (root / "val2017", root / "annotations" / "instances_val2017.json")
    return check_dataset(train, val, **kwargs)


def finding(report: DatasetReport, code: str, split: str | None = "train") -> Finding:
    matches = [f for f in report.findings if f.code == code and f.split == split]
    assert len(matches) == 1, f"expected one {code} finding, got {report.findings}"
    return matches[0]


def test_clean_dataset_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_clean(tmp_path)
    report = check(tmp_path)
    assert report.ok and report.errors == []
    assert [f.severity for f in report.findings] == [INFO]  # train image 3 has no annotations
    assert finding(report, "no_annotations").items == ["image 3"]
    train = report.split("train").scan
    assert (train.num_images, train.num_objects, dict(train.instances)) == (3, 3, {1: 1, 2: 2})
    assert dict(train.images_per_category) == {1: 1, 2: 2}
    # 20x10 = 200 px² small, 50x50 = 2500 medium, 64x64 = 4096 medium
    assert train.size_counts() == {"small": 1, "medium": 2, "large": 0}
    assert report.split("train").decoded

    assert main([f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK: 0 errors, 0 warnings, 1 note")
    assert "3 images (1 without annotations)" in out and "2 dog" in out


def test_each_problem_is_reported_with_its_id_or_file(tmp_path: Path) -> None:
    write_broken(tmp_path)
    report = check(tmp_path)
    assert not report.ok
    expected = {
        "missing_file": (ERROR, "gone.jpg (image 2)"),
        "undecodable": (ERROR, "corrupt.jpg (image 3)"),
        "duplicate_image_id": (ERROR, "image 3"),
        "duplicate_annotation_id": (WARNING, "annotation 25"),  # train: evaluation unaffected
        "empty_box": (WARNING, "annotation 21 (image 1)"),
        "box_outside_image": (WARNING, "annotation 22 (image 1, 100x50)"),
        "unknown_category": (ERROR, "annotation 23: category_id 99"),
        "unknown_image": (ERROR, "annotation 24: image_id 7"),
    }
    for code, (severity, item) in expected.items():
        found = finding(report, code)
        assert found.severity == severity, code
        assert len(found.items) == 1 and found.items[0].startswith(item), found.items
    assert "bbox [10, 10, 0, 5]" in finding(report, "empty_box").items[0]
    assert "bbox [90, 40, 20, 20]" in finding(report, "box_outside_image").items[0]
    assert all(f.split == "train" for f in report.findings)  # val is clean

    text = format_report(report)
    assert finding(report, "no_annotations").items == ["image 2", "image 3"]
    assert text.splitlines()[-1] == "FAILED: 5 errors, 3 warnings, 1 note"
    assert "corrupt.jpg (image 3): " in text and "gone.jpg (image 2)" in text


@pytest.mark.parametrize("bbox", [[1, 2, 3], "1234", [0, 0, float("nan"), 1], None, [0, 0, "w", 1]])
def test_malformed_boxes(bbox: object) -> None:
    dataset = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": bbox}],
        "categories": CATEGORIES,
    }
    scan, index = scan_annotations(dataset)
    assert scan.malformed_boxes == [(5, bbox)] and index.objects == {1: []}
    found = annotation_findings("val", scan, Path("val.json"))
    assert [(f.code, f.items) for f in found if f.severity == ERROR] == [
        ("malformed_bbox", [f"annotation 5: bbox {bbox!r}"])
    ]


def test_image_size_differing_from_the_json(tmp_path: Path) -> None:
    write_clean(tmp_path)
    path = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 81  # the file is 80x60
    path.write_text(json.dumps(data))
    found = finding(check(tmp_path), "size_mismatch", "val")
    assert found.severity == WARNING
    assert found.items == ["10.jpg (image 10): 'images' says 81x60, the file is 80x60"]


def test_strict_makes_box_problems_errors(tmp_path: Path) -> None:
    write_broken(tmp_path)
    report = check(tmp_path, plan=TrainingPlan(strict=True), decode=False)
    assert finding(report, "empty_box").severity == ERROR
    assert finding(report, "box_outside_image").severity == ERROR
    assert "data.strict=true" in finding(report, "empty_box").message


def test_items_beyond_max_examples_are_counted(tmp_path: Path) -> None:
    write_clean(tmp_path)
    images = [{"id": 1, "width": 20, "height": 20}]
    annotations = [
        {"id": i, "image_id": 1, "category_id": 1, "bbox": [float(i), 0.0, 30.0, 5.0]}
        for i in range(1, 6)
    ]
    write_coco(tmp_path, images, annotations, CATEGORIES, split="train")
    report = check(tmp_path, decode=False)
    assert len(finding(report, "box_outside_image").items) == 5
    lines = format_report(report, max_examples=2).splitlines()
    shown = [line for line in lines if line.strip().startswith("annotation ")]
    assert len(shown) == 2 and "            ... and 3 more" in lines


def test_unreadable_files_are_findings(tmp_path: Path) -> None:
    write_clean(tmp_path)
    (tmp_path / "annotations" / "instances_train2017.json").write_text('{"images": [')
    for path in (tmp_path / "val2017").iterdir():
        path.unlink()
    (tmp_path / "val2017").rmdir()
    report = check(tmp_path)
    assert "is not valid JSON" in finding(report, "annotation_file").message
    assert report.split("train").scan is None
    assert str(tmp_path / "val2017") in finding(report, "image_dir_missing", "val").message
    assert "(annotation file not readable)" in format_report(report)


def test_categories_differing_between_splits(tmp_path: Path) -> None:
    write_clean(tmp_path)
    path = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"][1]["name"] = "wolf"
    path.write_text(json.dumps(data))
    found = finding(check(tmp_path, decode=False), "categories_differ", None)
    assert found.severity == ERROR and found.items == ["category 2: train 'dog', val 'wolf'"]


def test_validation_annotations_must_have_evaluation_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pycocotools reads id, area and iscrowd of every ground-truth annotation: the report
    makes their absence an error, and the data module refuses such a split at setup instead of
    failing in the first validation."""
    write_clean(tmp_path)
    path = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    del data["annotations"][0]["area"], data["annotations"][1]["iscrowd"]
    path.write_text(json.dumps(data))
    found = finding(check(tmp_path, decode=False), "evaluation_keys", "val")
    assert found.items == ["annotation 10: lacks ['area']", "annotation 11: lacks ['iscrowd']"]

    datamodule = CocoDataModule(root=tmp_path, num_workers=0, batch_size=1)
    with pytest.raises(ValueError, match=r"instances_val2017\.json: .*annotation 10: lacks"):
        datamodule.setup("validate")


def test_datamodule_logs_a_summary_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_clean(tmp_path)
    datamodule = CocoDataModule(root=tmp_path, num_workers=0, batch_size=1)
    with caplog.at_level(logging.INFO, logger="detr_lightning.lightning.datamodule"):
        datamodule.setup("fit")
    lines = [
        r.getMessage() for r in caplog.records if r.name == "detr_lightning.lightning.datamodule"
    ]
    assert lines == [
        "train: 3 images (1 without annotations), 3 objects of 2 categories, up to 2 per image",
        "val: 2 images (0 without annotations), 2 objects of 2 categories, up to 1 per image",
    ]


def write_many_objects(root: Path, count: int) -> None:
    write_clean(root)
    images = [{"id": 1, "width": 400, "height": 300}]
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": 1 + i % 2, "bbox": [i * 10.0, 0, 8.0, 8.0]}
        for i in range(count)
    ]
    write_coco(root, images, annotations, CATEGORIES, split="train")


def test_more_objects_than_queries(tmp_path: Path) -> None:
    write_many_objects(tmp_path, 12)
    report = check(tmp_path, plan=TrainingPlan(num_queries=10), decode=False)
    found = finding(report, "too_many_objects")
    assert found.severity == WARNING and found.items == ["image 1: 12 objects"]
    assert any("model.num_queries above 12" in text for text in report.advice)
    report = check(tmp_path, plan=TrainingPlan(num_queries=100), decode=False)
    assert not [f for f in report.findings if f.code == "too_many_objects"]
    assert not any("model.num_queries above" in text for text in report.advice)


def test_advice_follows_the_numbers(tmp_path: Path) -> None:
    write_clean(tmp_path)
    scratch = check(tmp_path, plan=TrainingPlan(batch_size=64, max_epochs=50), decode=False)
    advice = " | ".join(scratch.advice)
    assert "3 training images are few" in advice and "experiment=finetune_custom" in advice
    assert "data.batch_size=64 (global) leaves 1 optimizer step(s)" in advice
    assert "trainer.max_epochs=50 makes 50 steps" in advice
    assert "cat (1), dog (2)" in advice  # rare categories with their counts
    assert "validation split has 2 images" in advice

    plan = TrainingPlan(batch_size=2, max_epochs=3000, pretrained="detr.pth", num_queries=100)
    tuned = " | ".join(check(tmp_path, plan=plan, decode=False).advice)
    assert "are few" not in tuned and "leaves" not in tuned  # fine-tuning, batch already small
    assert "trainer.max_epochs=3000 makes 6000 steps: enough" in tuned
    assert "could be lowered" not in tuned  # keeps the checkpoint's 100 queries

    mapping = check(tmp_path, plan=TrainingPlan(label_mapping="category_id"), decode=False)
    assert any("num_classes = max id + 1 = 3 for 2 categories" in t for t in mapping.advice)


def test_small_box_advice_measures_at_the_input_size(tmp_path: Path) -> None:
    write_many_objects(tmp_path, 6)  # 8x8 boxes in a 400x300 image
    # at the evaluation size (short side 800) the boxes are 21x21 px: still small
    plan = TrainingPlan(num_queries=100, val_size=800)
    assert any("under 32x32 px" in t for t in check(tmp_path, plan=plan, decode=False).advice)
    # short side 1600 (x5.3): 43x43 px, no longer small
    plan = TrainingPlan(num_queries=100, val_size=1600, max_size=4000)
    assert not any("under 32x32" in t for t in check(tmp_path, plan=plan, decode=False).advice)
