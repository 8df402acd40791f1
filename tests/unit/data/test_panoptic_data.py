"""The synthetic panoptic set and the COCO panoptic dataset: exact masks, boxes of the
masks, augmentations that move masks with boxes, padded batches, bad files named."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from detr_lightning.data.collate import collate_detection
from detr_lightning.data.panoptic import CocoPanoptic, read_segment_ids
from detr_lightning.data.presets import make_train_transforms, make_val_transforms
from detr_lightning.data.synthetic_panoptic import generate_synthetic_panoptic
from detr_lightning.evaluation.panoptic_quality import pq_from_files


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic-panoptic")
    return generate_synthetic_panoptic(path, num_train=12, num_val=4, crowd_fraction=0.3,
                                       void_border=2, seed=3)  # fmt: skip


def _dataset(root, split="train", **kwargs):
    return CocoPanoptic(root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017.json",
                        **kwargs)  # fmt: skip


def test_generator_is_deterministic_and_its_segments_are_exact(root, tmp_path):
    again = generate_synthetic_panoptic(tmp_path, num_train=12, num_val=4, crowd_fraction=0.3,
                                        void_border=2, seed=3)  # fmt: skip
    for path in sorted((root / "annotations").rglob("*.png"))[:5]:
        assert path.read_bytes() == (again / path.relative_to(root)).read_bytes()
    data = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    assert {c["isthing"] for c in data["categories"]} == {0, 1}
    crowds = 0
    for annotation in data["annotations"]:
        ids = read_segment_ids(
            root / "annotations" / "panoptic_train2017" / annotation["file_name"]
        )
        listed = {s["id"] for s in annotation["segments_info"]}
        assert set(np.unique(ids).tolist()) == listed | {0}  # VOID: the border only
        assert (ids[:2] == 0).all() and (ids[2:-2, 2:-2] != 0).all()
        for segment in annotation["segments_info"]:
            rows, cols = np.nonzero(ids == segment["id"])
            assert segment["area"] == len(rows)
            assert segment["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1,
                                       rows.max() - rows.min() + 1]  # fmt: skip
            crowds += segment["iscrowd"]
    assert crowds > 0


def test_targets_are_the_png_segments_without_crowd(root):
    dataset = _dataset(root)
    data = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    for index in range(4):
        image, target = dataset[index]
        annotation = data["annotations"][index]
        ids = read_segment_ids(
            root / "annotations" / "panoptic_train2017" / annotation["file_name"]
        )
        kept = [s for s in annotation["segments_info"] if not s["iscrowd"]]
        assert image.shape[-2:] == ids.shape and target["masks"].shape == (len(kept), *ids.shape)
        for mask, segment, label, box in zip(target["masks"], kept, target["labels"],
                                             target["boxes"]):  # fmt: skip
            assert torch.equal(mask, torch.from_numpy(ids == segment["id"]))
            assert dataset.label_map.category_ids[int(label)] == segment["category_id"]
            x, y, w, h = segment["bbox"]
            height, width = ids.shape
            expected = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
            assert box.tolist() == pytest.approx(expected, abs=1e-6)


def test_augmentations_move_masks_with_boxes(root):
    transforms = make_train_transforms(scales=[96, 112, 128], max_size=200, crop_resize=[100],
                                       crop_min=40, crop_max=80, crop_probability=0.5)  # fmt: skip
    dataset = _dataset(root, transforms=transforms)
    checked = 0
    for index in range(len(dataset)):
        for seed in range(3):
            image, target = dataset[(index, seed)]
            assert target["masks"].shape[-2:] == image.shape[-2:]
            assert dataset.output_size((index, seed)) == tuple(image.shape[-2:])
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height])
            for mask, box in zip(target["masks"], target["boxes"]):
                cx, cy, w, h = (box * scale).tolist()
                rows, cols = torch.nonzero(mask, as_tuple=True)
                from_mask = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]])
                from_box = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
                # nearest resizing moves a mask edge by up to one source pixel (the crop's
                # upscaling makes that up to 3 output pixels); a flipped or shifted mask is
                # far off
                assert (from_mask - from_box).abs().max() <= 3.5
                assert box_iou(from_mask.float(), from_box)[0, 0] >= 0.75
                checked += 1
    assert checked > 50


def test_collate_pads_masks_to_the_batch_canvas(root):
    dataset = _dataset(root, transforms=make_val_transforms(val_size=96, max_size=160))
    batch = [dataset[i] for i in range(3)]
    images, _, targets = collate_detection(batch)
    for (image, original), target in zip(batch, targets):
        masks = target["masks"]
        assert masks.shape[-2:] == images.shape[-2:]
        height, width = image.shape[-2:]
        assert torch.equal(masks[:, :height, :width], original["masks"])
        assert not masks[:, height:].any() and not masks[:, :, width:].any()


def test_ground_truth_scores_pq_one(root, tmp_path):
    annotations = root / "annotations"
    shutil.copytree(annotations / "panoptic_val2017", tmp_path / "pred")
    pred = json.loads((annotations / "panoptic_val2017.json").read_text())
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": pred["annotations"]}))
    result = pq_from_files(annotations / "panoptic_val2017.json", tmp_path / "pred.json",
                           pred_folder=tmp_path / "pred")  # fmt: skip
    assert result["all"]["pq"] == pytest.approx(1.0) and result["stuff"]["n"] >= 2


def _copy(root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target, target / "annotations" / "panoptic_val2017.json"


def test_bad_panoptic_data_is_named(root, tmp_path, caplog):
    copy, json_path = _copy(root, tmp_path)
    data = json.loads(json_path.read_text())
    png = copy / "annotations" / "panoptic_val2017" / data["annotations"][0]["file_name"]

    # a segment of the JSON without pixels, and a PNG id without a JSON entry: warned, not fatal
    ids = read_segment_ids(png)
    first = data["annotations"][0]["segments_info"][0]["id"]
    ids[ids == first] = 77
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(png)
    with caplog.at_level(logging.WARNING):
        _, target = _dataset(copy, "val")[0]
    assert f"segments [{first}] have no pixels" in caplog.text and "PNG ids [77]" in caplog.text
    kept = [s for s in data["annotations"][0]["segments_info"] if not s["iscrowd"]]
    assert len(target["masks"]) == len(kept) - 1

    # a PNG of another size
    Image.fromarray(rgb[:-3]).save(png)
    with pytest.raises(ValueError, match=r"must have the image's size"):
        _dataset(copy, "val")[0]

    # a missing PNG
    png.unlink()
    with pytest.raises(FileNotFoundError, match=png.name):
        _dataset(copy, "val")

    # a category the file does not list
    data["annotations"][1]["segments_info"][0]["category_id"] = 999
    json_path.write_text(json.dumps(data))
    Image.fromarray(rgb).save(png)
    with pytest.raises(ValueError, match="category_id 999"):
        _dataset(copy, "val")
