"""Panoptic samples from a COCO panoptic directory: images, ``panoptic_*.json`` and the PNG
segment maps, one mask per segment.

Each item is ``(image, target)`` as :class:`~detr_lightning.data.coco.CocoDetection` gives
(``boxes`` normalized cxcywh, ``labels``, ``image_id``, ``orig_size``, ``size``,
``stand_in_for`` -1) plus ``masks``: bool [n, H, W], one per segment, transformed with the
image (flip, resize with nearest neighbours, crop). Every segment is an object to predict,
thing or stuff; crowd segments (``iscrowd=1``) are left out of the targets and their pixels
count as unlabeled, as are VOID pixels (id 0): the PQ evaluation reads them from the files.
A segment's box is that of its pixels (pixel edges, XYXY), the official choice
(``masks_to_boxes``), not the JSON's ``bbox``.

Problems with the files are named: a missing image or PNG, a PNG whose size differs from its
image, a category outside the label map are errors (listed before training starts where the
JSON tells); a segment of the JSON without pixels in the PNG is skipped and an id of the PNG
without a JSON entry is unlabeled, each with a warning that names the image and the ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..ops.boxes import mask_boxes
from .coco import _seeded, load_coco_json, missing_image_files, read_rgb, transform_sample
from .labels import LabelMap

log = logging.getLogger(__name__)

__all__ = ["CocoPanoptic", "id_to_rgb", "read_segment_ids", "rgb_to_id", "segment_extent"]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours [H, W, 3] uint8 -> segment ids ``R + 256 G + 256^2 B``."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> COCO panoptic PNG colours [H, W, 3] uint8."""
    ids = np.asarray(ids).astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def read_segment_ids(path: str | os.PathLike) -> np.ndarray:
    """A COCO panoptic PNG as segment ids [H, W] int64."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic segmentation PNG not found: {path}")
    with Image.open(path) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def segment_extent(pixels: np.ndarray) -> tuple[int, list[int]]:
    """(area, COCO ``bbox`` [x, y, width, height] in whole pixels) of a [H, W] bool mask;
    an empty mask gives (0, [0, 0, 0, 0])."""
    rows, cols = np.nonzero(pixels)
    if len(rows) == 0:
        return 0, [0, 0, 0, 0]
    x, y = int(cols.min()), int(rows.min())
    return len(rows), [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1]


@dataclass
class _PanopticRecord:
    image_id: int
    path: Path
    png: Path
    height: int
    width: int
    segment_ids: list[int]  # the non-crowd segments
    labels: list[int]
    crowd_ids: list[int]


class CocoPanoptic(Dataset):
    """COCO panoptic samples (see the module docstring).

    Args:
        image_dir: the images (e.g. ``val2017/``).
        annotation_file: the panoptic JSON (e.g. ``annotations/panoptic_val2017.json``).
        segmentation_dir: the PNG folder; default: the JSON's path without ``.json``, COCO's
            layout.
        transforms: called as ``transforms(image, {"boxes", "labels", "masks"})`` with a uint8
            ``tv_tensors.Image``, XYXY ``BoundingBoxes`` and a ``tv_tensors.Mask``.
        label_map: category ids -> labels; default: the JSON's categories, contiguous.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        segmentation_dir: str | os.PathLike | None = None,
        *,
        transforms: Callable[..., Any] | None = None,
        label_map: LabelMap | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.segmentation_dir = (
            Path(segmentation_dir)
            if segmentation_dir is not None
            else self.annotation_file.with_suffix("")
        )
        for folder, what in ((self.image_dir, "images"), (self.segmentation_dir, "PNG maps")):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist; it should hold the {what} of "
                    f"{self.annotation_file} (COCO layout: val2017/ and "
                    "annotations/panoptic_val2017/ beside annotations/panoptic_val2017.json)"
                )
        dataset = load_coco_json(self.annotation_file)
        for key in ("images", "annotations", "categories"):
            if key not in dataset:
                raise ValueError(f"{self.annotation_file} has no {key!r}: not a COCO panoptic "
                                 "file (panoptic_*.json)")  # fmt: skip
        self.categories: list[dict[str, Any]] = dataset["categories"]
        self.is_thing = {int(c["id"]): bool(c.get("isthing", 1)) for c in self.categories}
        self.label_map = label_map or LabelMap.from_coco(dataset)
        self.transforms = transforms
        self._records = self._build_records(dataset)
        self._checked: set[int] = set()  # images whose PNG ids were compared with the JSON

    def _build_records(self, dataset: dict[str, Any]) -> list[_PanopticRecord]:
        images = {int(entry["id"]): entry for entry in dataset["images"]}
        annotations = {int(a["image_id"]): a for a in dataset["annotations"]}
        without = sorted(set(images) - set(annotations))
        if without:
            raise ValueError(
                f"{self.annotation_file}: images {without[:5]} have no panoptic annotation; "
                "every image needs one (its PNG and segments_info)"
            )
        missing = missing_image_files(self.image_dir, [e["file_name"] for e in images.values()])
        missing_png = missing_image_files(
            self.segmentation_dir, [a["file_name"] for a in annotations.values()]
        )
        for names, folder in ((missing, self.image_dir), (missing_png, self.segmentation_dir)):
            if names:
                raise FileNotFoundError(
                    f"{len(names)} file(s) listed in {self.annotation_file} are missing from "
                    f"{folder}, e.g. {names[:3]}; check that the folders match the JSON "
                    "(val2017/ and annotations/panoptic_val2017/ with panoptic_val2017.json)"
                )
        records = []
        for image_id, entry in images.items():
            annotation = annotations[image_id]
            segment_ids, labels, crowd_ids = [], [], []
            for segment in annotation["segments_info"]:
                category = int(segment["category_id"])
                if category not in self.is_thing:
                    raise ValueError(
                        f"{self.annotation_file}: segment {segment['id']} of image {image_id} "
                        f"has category_id {category}, which 'categories' does not list"
                    )
                try:
                    label = self.label_map.category_to_label(category)
                except ValueError as err:
                    raise ValueError(f"{self.annotation_file}, image {image_id}: {err}") from None
                if segment.get("iscrowd", 0) == 1:
                    crowd_ids.append(int(segment["id"]))
                    continue
                segment_ids.append(int(segment["id"]))
                labels.append(label)
            records.append(
                _PanopticRecord(
                    image_id=image_id,
                    path=self.image_dir / entry["file_name"],
                    png=self.segmentation_dir / annotation["file_name"],
                    height=int(entry["height"]),
                    width=int(entry["width"]),
                    segment_ids=segment_ids,
                    labels=labels,
                    crowd_ids=crowd_ids,
                )
            )
        return records

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [record.image_id for record in self._records]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        """Sample ``key``; an ``(index, seed)`` key runs the random transforms under ``seed``."""
        if isinstance(key, tuple):
            index, seed = key
            return _seeded(seed, self._load, index)
        return self._load(key)

    def output_size(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(H, W) that sample ``key`` will have, from the transforms' ``output_size`` (under the
        sample's seed) when they have one, else the image's recorded size."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self._records[index]
        predict = getattr(self.transforms, "output_size", None)
        if predict is None:
            return record.height, record.width
        if seed is None:
            return predict(record.height, record.width)
        return _seeded(seed, predict, record.height, record.width)

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        record = self._records[index]
        image = read_rgb(record.path)
        ids = read_segment_ids(record.png)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if ids.shape != (height, width):
            raise ValueError(
                f"{record.png} is {ids.shape[1]}x{ids.shape[0]} but its image {record.path} is "
                f"{width}x{height}; the PNG must have the image's size"
            )
        masks = torch.from_numpy(ids[None] == np.asarray(record.segment_ids)[:, None, None])
        present = masks.flatten(1).any(1)
        self._warn_once(record, ids, present)
        masks = masks[present]
        labels = torch.tensor(record.labels, dtype=torch.int64)[present]
        boxes = mask_boxes(masks)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
            "masks": tv_tensors.Mask(masks),
        }
        image, result = transform_sample(image, target, self.transforms)
        result.update({
            "image_id": record.image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "stand_in_for": -1,
        })  # fmt: skip
        return image, result

    def _warn_once(self, record: _PanopticRecord, ids: np.ndarray, present: Tensor) -> None:
        """Name the segments without pixels and the PNG ids without a JSON entry (the first
        time an image loads in a process: the files do not change between epochs)."""
        if record.image_id in self._checked:
            return
        self._checked.add(record.image_id)
        empty = [s for s, p in zip(record.segment_ids, present.tolist()) if not p]
        listed = {0, *record.segment_ids, *record.crowd_ids}
        unlisted = sorted(set(np.unique(ids).tolist()) - listed)
        problems = []
        if empty:
            problems.append(f"segments {empty} have no pixels in the PNG and are skipped")
        if unlisted:
            problems.append(f"PNG ids {unlisted} are not in the JSON and count as unlabeled")
        if problems:
            log.warning("image %s (%s): %s; fix %s or the PNG", record.image_id, record.png,
                        "; ".join(problems), self.annotation_file)  # fmt: skip
