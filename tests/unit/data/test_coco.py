"""CocoDetection targets, the label map, and every bad-data path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from detr_lightning.data import CocoDetection, LabelMap, make_train_transforms
from detr_lightning.data.labels import UNUSED_NAME
from helpers.data import make_tiny_synthetic, tiny_coco, write_coco, write_image

CATEGORIES = [{"id": 2, "name": "b"}, {"id": 9, "name": "z"}, {"id": 4, "name": "d"}]


# ---------------------------------------------------------------------------------- label map


def test_label_map_contiguous() -> None:
    label_map = LabelMap.from_coco({"categories": CATEGORIES})
    assert label_map.category_ids == [2, 4, 9] and label_map.names == ["b", "d", "z"]
    assert label_map.num_classes == 3
    assert [label_map.category_to_label(c) for c in (2, 4, 9)] == [0, 1, 2]
    assert label_map.label_to_category(torch.tensor([2, 0, 1])).tolist() == [9, 2, 4]


def test_label_map_category_id_mode() -> None:
    label_map = LabelMap.from_coco({"categories": CATEGORIES}, mode="category_id")
    assert label_map.num_classes == 10  # max id + 1, as the official COCO checkpoints (91)
    assert label_map.names[4] == "d" and label_map.names[0] == UNUSED_NAME
    for cat_id in (2, 4, 9):
        assert label_map.category_to_label(cat_id) == cat_id
    assert label_map.label_to_category([9, 2]).tolist() == [9, 2]


@pytest.mark.parametrize("mode", ["contiguous", "category_id"])
def test_label_map_dict_round_trip(mode: str) -> None:
    label_map = LabelMap.from_coco({"categories": CATEGORIES}, mode=mode)
    restored = LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict())))
    assert restored == label_map
    assert restored.category_to_label(9) == label_map.category_to_label(9)


def test_label_map_errors() -> None:
    label_map = LabelMap.from_coco({"categories": CATEGORIES})
    with pytest.raises(ValueError, match=r"category id 5 is not in the label map"):
        label_map.category_to_label(5)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        label_map.label_to_category([3])
    with pytest.raises(ValueError, match=r"unknown label mapping 'sparse'"):
        LabelMap.from_coco({"categories": CATEGORIES}, mode="sparse")
    with pytest.raises(ValueError, match=r"category_ids"):
        LabelMap.from_dict({"names": []})


# ------------------------------------------------------------------------------------ targets


def test_targets_of_hand_made_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image_dir, annotation_file = tiny_coco(tmp_path)
    dataset = CocoDetection(image_dir, annotation_file)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert len(dataset) == 2 and dataset.image_ids == [1, 2]
    assert dataset.label_map.category_ids == [3, 7]

    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 50, 100)
    assert image.min() >= 0.0 and image.max() <= 1.0
    # bbox [10, 5, 20, 10] in a 100 x 50 image: center (20, 10), size (20, 10)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.2, 0.2, 0.2]]))
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1]  # category 7 is the second id
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [50, 100] and target["size"].tolist() == [50, 100]
    assert target["orig_size"].dtype == torch.int64

    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["orig_size"].tolist() == [80, 40]


def test_crowd_regions_are_not_targets(tmp_path: Path) -> None:
    """iscrowd=1 annotations are left out of the targets (COCO evaluation reads them from the
    annotation file)."""
    image_dir, annotation_file = tiny_coco(tmp_path)
    _, target = CocoDetection(image_dir, annotation_file)[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.2, 0.2, 0.2]]))
    assert target["labels"].tolist() == [1]  # category 7 of (3, 7)


def test_category_id_mode_labels(tmp_path: Path) -> None:
    image_dir, annotation_file = tiny_coco(tmp_path)
    dataset = CocoDetection(image_dir, annotation_file, label_mapping="category_id")
    assert dataset.label_map.num_classes == 8
    assert dataset[0][1]["labels"].tolist() == [7]


def test_boxes_clamped_and_degenerate_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = [{"id": 1, "width": 100, "height": 50}]
    annotations = [
        {"id": 21, "image_id": 1, "category_id": 1, "bbox": [90.0, 40.0, 20.0, 20.0]},  # clamped
        {"id": 22, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 0.0, 5.0]},  # w = 0
        {"id": 23, "image_id": 1, "category_id": 1, "bbox": [120.0, 0.0, 5.0, 5.0]},  # outside
        {"id": 24, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 100.3, 50.0]},  # rounding
    ]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, [{"id": 1}])
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(image_dir, annotation_file)
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "[21, 22, 23]" in message and str(annotation_file) in message
    assert "1 clamped" in message and "2 left empty and dropped" in message
    _, target = dataset[0]
    # [90, 40, 100, 50] -> center (95, 45), size (10, 10); [0, 0, 100, 50] whole image
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[0.95, 0.9, 0.1, 0.2], [0.5, 0.5, 1.0, 1.0]])
    )
    with pytest.raises(ValueError, match=r"annotation ids \[21, 22, 23\]"):
        CocoDetection(image_dir, annotation_file, strict=True)


# ----------------------------------------------------------------------------------- bad data


def test_missing_annotation_file(tmp_path: Path) -> None:
    image_dir, _ = tiny_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"instances_nope.json does not exist"):
        CocoDetection(image_dir, tmp_path / "instances_nope.json")


def test_missing_image_dir(tmp_path: Path) -> None:
    _, annotation_file = tiny_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image directory .*nope2017 does not exist"):
        CocoDetection(tmp_path / "nope2017", annotation_file)


def test_invalid_json(tmp_path: Path) -> None:
    image_dir, annotation_file = tiny_coco(tmp_path)
    annotation_file.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances_val2017.json is not valid JSON"):
        CocoDetection(image_dir, annotation_file)


def test_json_without_images_key(tmp_path: Path) -> None:
    image_dir, annotation_file = tiny_coco(tmp_path)
    annotation_file.write_text('{"categories": []}')
    with pytest.raises(ValueError, match=r"has no 'images' list"):
        CocoDetection(image_dir, annotation_file)


def test_image_missing_on_disk(tmp_path: Path) -> None:
    image_dir, annotation_file = tiny_coco(tmp_path)
    (image_dir / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .* e\.g\. \['2\.jpg'\]"):
        CocoDetection(image_dir, annotation_file)


def test_corrupt_image_is_replaced_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An undecodable image is replaced by the next readable one, which says whom it stands
    in for; the warning names the file once per process."""
    image_dir, annotation_file = tiny_coco(tmp_path)
    (image_dir / "2.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    dataset = CocoDetection(image_dir, annotation_file)
    with caplog.at_level(logging.WARNING):
        image, target = dataset[1]
        again, _ = dataset[1]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "2.jpg" in messages[0] and "image_id 2" in messages[0]
    first_image, first_target = dataset[0]
    # image 2 (index 1) is the last one, so image 1 (index 0) stands in for it
    assert target["image_id"] == first_target["image_id"] == 1
    assert target["stand_in_for"] == 2 and first_target["stand_in_for"] == -1
    assert torch.equal(image, first_image) and torch.equal(again, image)
    assert dataset.unreadable == {1}


def test_no_readable_image_is_an_error(tmp_path: Path) -> None:
    image_dir, annotation_file = tiny_coco(tmp_path)
    for path in image_dir.iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"no image of .*instances_val2017\.json"):
        CocoDetection(image_dir, annotation_file)[0]


def test_unknown_category(tmp_path: Path) -> None:
    images = [{"id": 1, "width": 30, "height": 30}]
    annotations = [{"id": 77, "image_id": 1, "category_id": 99, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, [{"id": 1}])
    with pytest.raises(
        ValueError, match=r"annotation 77 in .*instances_val2017.json .*category_id 99"
    ):
        CocoDetection(image_dir, annotation_file)


def test_empty_dataset(tmp_path: Path) -> None:
    image_dir, annotation_file = write_coco(tmp_path, [], [], [{"id": 1}])
    with pytest.raises(ValueError, match=r"instances_val2017.json lists no images"):
        CocoDetection(image_dir, annotation_file)


def test_annotation_for_unknown_image(tmp_path: Path) -> None:
    images = [{"id": 1, "width": 30, "height": 30}]
    annotations = [{"id": 5, "image_id": 8, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0]}]
    image_dir, annotation_file = write_coco(tmp_path, images, annotations, [{"id": 1}])
    with pytest.raises(ValueError, match=r"annotation 5 .* image_id 8"):
        CocoDetection(image_dir, annotation_file)


@pytest.mark.parametrize(("mode", "suffix"), [("L", ".jpg"), ("RGBA", ".png"), ("RGB", ".bmp")])
def test_images_are_read_as_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    images = [{"id": 1, "width": 24, "height": 16, "file_name": f"1{suffix}"}]
    image_dir, annotation_file = write_coco(tmp_path, images, [], [{"id": 1}], write_files=False)
    write_image(image_dir / f"1{suffix}", 24, 16, mode=mode)
    image, target = CocoDetection(image_dir, annotation_file)[0]
    assert image.shape == (3, 16, 24) and target["size"].tolist() == [16, 24]


def test_train_preset_on_synthetic(tmp_path: Path) -> None:
    root = make_tiny_synthetic(tmp_path)
    transforms = make_train_transforms(
        scales=[64, 80, 96], max_size=160, crop_resize=[64, 80], crop_min=40, crop_max=70
    )
    dataset = CocoDetection(
        root / "train2017", root / "annotations/instances_train2017.json", transforms=transforms
    )
    torch.manual_seed(0)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape[1:] == tuple(target["size"].tolist())
        boxes = target["boxes"]
        assert boxes.shape[0] == target["labels"].shape[0]
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > 0).all()
        assert (target["labels"] < dataset.label_map.num_classes).all()


def test_reduced_jpeg_decode_gives_writable_pixels(tmp_path: Path) -> None:
    """The 1/2..1/8-scale JPEG decode hands torch memory it owns: no read-only NumPy buffer
    (torch warns about it, and writing into one is undefined)."""
    import warnings

    import numpy as np
    from PIL import Image

    from detr_lightning.data.coco import _read_rgb

    path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, size = _read_rgb(path, short_side=100)
    assert size == (480, 640)
    assert tuple(pixels.shape) == (3, 120, 160)  # decoded at 1/4 scale
    pixels[0, 0, 0] = 7  # the tensor's own memory
    assert int(pixels[0, 0, 0]) == 7
