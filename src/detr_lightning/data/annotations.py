"""One pass over a parsed COCO instances file: every check that needs only the JSON, and the
statistics of what it describes.

:class:`~detr_lightning.data.coco.CocoDetection` builds its samples from this pass and raises on
the problems that would fail a run; :mod:`detr_lightning.data.checks` lists all of them for
the user. Both read the same lists, so each check has one implementation.

Boxes: ``bbox`` is COCO's ``[x, y, width, height]`` in pixels. A box that overshoots its image
by more than :data:`BOX_TOLERANCE` pixels, or has a width or height <= 0, is recorded as a
:class:`BoxIssue`; the kept box is clamped to the image and dropped when nothing is left.
Crowd regions (``iscrowd=1``) are not objects to detect: they are counted, never checked or
kept.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BOX_TOLERANCE",
    "EVALUATION_KEYS",
    "IMAGE_KEYS",
    "LARGE_AREA",
    "SMALL_AREA",
    "AnnotationIndex",
    "AnnotationScan",
    "BoxIssue",
    "category_names",
    "scan_annotations",
]

# Boxes may overshoot their image by this many pixels (float rounding in real annotation files)
# without being reported; they are clamped all the same.
BOX_TOLERANCE = 1.0
# COCO evaluation's object size ranges (areas in pixels of the original image).
SMALL_AREA = 32**2
LARGE_AREA = 96**2
IMAGE_KEYS = ("id", "file_name", "width", "height")
# pycocotools indexes ground truth by "id" and reads "area" (size ranges) and "iscrowd" of
# every annotation: without them, evaluation fails with a KeyError.
EVALUATION_KEYS = ("id", "area", "iscrowd")
_EVALUATION_KEYSET = frozenset(EVALUATION_KEYS)


def category_names(categories: list[dict[str, Any]]) -> dict[int, str]:
    """``{category id: name}`` of a COCO ``categories`` list (the id where a name is missing)."""
    return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}


@dataclass
class BoxIssue:
    """A box beyond its image or with a width/height <= 0, as annotated."""

    annotation_id: Any
    image_id: int
    bbox: tuple[float, float, float, float]  # x, y, width, height in pixels
    image_size: tuple[int, int]  # (width, height) from the image entry
    nonpositive: bool  # width or height <= 0
    outside: bool  # beyond the image by more than BOX_TOLERANCE
    dropped: bool  # nothing left after clamping to the image


@dataclass
class AnnotationScan:
    """Problems and statistics of one instances file; small enough to keep with a dataset.

    Per-image arrays are aligned with ``image_ids`` (the complete image entries, first
    occurrence of each id, in file order). "Objects" are the boxes kept as training targets:
    not crowd, clamped to the image, not empty.
    """

    categories: dict[int, str]
    image_ids: np.ndarray  # int64 [N]
    image_sizes: np.ndarray  # int64 [N, 2] (height, width) from the image entries
    annotations_per_image: np.ndarray  # int64 [N], every annotation of the image (crowd too)
    objects_per_image: np.ndarray  # int64 [N]
    object_areas: np.ndarray  # float64 [M] box areas in pixels of the original image
    object_images: np.ndarray  # int64 [M] position of each object's image in image_ids
    num_annotations: int = 0
    num_crowd: int = 0
    incomplete_images: list[tuple[Any, list[str]]] = field(default_factory=list)  # (id, keys)
    duplicate_image_ids: list[Any] = field(default_factory=list)
    duplicate_annotation_ids: list[Any] = field(default_factory=list)
    unknown_categories: list[tuple[Any, Any]] = field(default_factory=list)  # (ann id, cat id)
    unknown_images: list[tuple[Any, Any]] = field(default_factory=list)  # (ann id, image id)
    malformed_boxes: list[tuple[Any, Any]] = field(default_factory=list)  # (ann id, bbox)
    box_issues: list[BoxIssue] = field(default_factory=list)
    # (annotation id, keys) of annotations lacking keys that COCO evaluation reads
    lacking_evaluation_keys: list[tuple[Any, list[str]]] = field(default_factory=list)
    instances: Counter = field(default_factory=Counter)  # category id -> objects
    images_per_category: Counter = field(default_factory=Counter)  # category id -> images

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_objects(self) -> int:
        return int(self.objects_per_image.sum())

    def images_without_annotations(self) -> list[int]:
        """Ids of the images that no annotation (crowd included) refers to."""
        return self.image_ids[self.annotations_per_image == 0].tolist()

    def size_counts(self, scales: np.ndarray | None = None) -> dict[str, int]:
        """Objects per COCO size range ("small" < 32², "medium", "large" > 96² px).

        ``scales`` (float [N], one per image) measures the boxes in resized images instead
        (areas scale with its square); by default in the original pixels.
        """
        areas = self.object_areas
        if scales is not None:
            areas = areas * np.asarray(scales, dtype=np.float64)[self.object_images] ** 2
        small, large = int((areas < SMALL_AREA).sum()), int((areas > LARGE_AREA).sum())
        return {"small": small, "medium": len(areas) - small - large, "large": large}


@dataclass
class AnnotationIndex:
    """What building samples needs from the file (large: not kept once samples are built)."""

    images: dict[int, dict[str, Any]]  # image id -> complete image entry
    # image id -> kept boxes as (x0, y0, x1, y1, category id, annotation id), xyxy clamped
    objects: dict[int, list[tuple[float, float, float, float, int, Any]]]


def scan_annotations(dataset: dict[str, Any]) -> tuple[AnnotationScan, AnnotationIndex]:
    """Check a parsed instances dict (see :func:`~detr_lightning.data.coco.load_coco_json`).

    Never raises on bad content: every problem is recorded in the scan. Annotations with an
    unknown category or image, or a malformed ``bbox``, are left out of the index and the
    statistics.
    """
    categories = category_names(dataset["categories"])
    empty = np.zeros(0, np.int64)
    scan = AnnotationScan(categories, empty, empty.reshape(0, 2), empty, empty, empty, empty)
    images: dict[int, dict[str, Any]] = {}
    for entry in dataset["images"]:
        missing = [key for key in IMAGE_KEYS if key not in entry]
        if missing:
            scan.incomplete_images.append((entry.get("id", entry), missing))
        elif int(entry["id"]) in images:
            scan.duplicate_image_ids.append(entry["id"])
        else:
            images[int(entry["id"])] = entry

    objects: dict[int, list] = {image_id: [] for image_id in images}
    position = {image_id: i for i, image_id in enumerate(images)}
    sizes = {image_id: (entry["width"], entry["height"]) for image_id, entry in images.items()}
    areas: list[float] = []
    object_images: list[int] = []
    annotation_counts: Counter = Counter()
    instances: Counter = Counter()
    seen_annotation_ids: set = set()
    scan.num_annotations = len(dataset["annotations"])
    num_crowd = 0
    for ann in dataset["annotations"]:  # a hot loop: 860k annotations in COCO train
        ann_id = ann.get("id")
        if ann_id in seen_annotation_ids and ann_id is not None:
            scan.duplicate_annotation_ids.append(ann_id)
        seen_annotation_ids.add(ann_id)
        if not ann.keys() >= _EVALUATION_KEYSET:
            lacking = [key for key in EVALUATION_KEYS if key not in ann]
            scan.lacking_evaluation_keys.append((ann_id, lacking))
        cat_id, image_id = ann.get("category_id"), ann.get("image_id")
        if cat_id not in categories or image_id not in images:
            if cat_id not in categories:
                scan.unknown_categories.append((ann_id, cat_id))
            if image_id not in images:
                scan.unknown_images.append((ann_id, image_id))
            continue
        annotation_counts[image_id] += 1
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        bbox = ann.get("bbox")
        try:
            x0, y0, w, h = (float(v) for v in bbox)
            finite = isinstance(bbox, (list, tuple)) and math.isfinite(x0 + y0 + w + h)
        except (TypeError, ValueError):  # not 4 values, or not numbers
            finite = False
        if not finite:
            scan.malformed_boxes.append((ann_id, bbox))
            continue
        width, height = sizes[image_id]
        x1, y1 = x0 + w, y0 + h
        outside = (
            x0 < -BOX_TOLERANCE
            or y0 < -BOX_TOLERANCE
            or x1 > width + BOX_TOLERANCE
            or y1 > height + BOX_TOLERANCE
        )
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        dropped = x1 <= x0 or y1 <= y0  # includes every box with width or height <= 0
        if outside or dropped:
            issue = BoxIssue(
                ann_id,
                image_id,
                (float(bbox[0]), float(bbox[1]), w, h),
                (int(width), int(height)),
                nonpositive=w <= 0 or h <= 0,
                outside=outside,
                dropped=dropped,
            )
            scan.box_issues.append(issue)
            if dropped:
                continue
        objects[image_id].append((x0, y0, x1, y1, cat_id, ann_id))
        instances[cat_id] += 1
        areas.append((x1 - x0) * (y1 - y0))
        object_images.append(position[image_id])

    scan.instances, scan.num_crowd = instances, num_crowd
    for boxes in objects.values():
        scan.images_per_category.update({box[4] for box in boxes})
    scan.image_ids = np.fromiter(images, dtype=np.int64, count=len(images))
    sizes = [(int(e["height"]), int(e["width"])) for e in images.values()]
    scan.image_sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)
    scan.object_areas = np.array(areas, dtype=np.float64)
    scan.object_images = np.array(object_images, dtype=np.int64)
    scan.annotations_per_image = np.array([annotation_counts[i] for i in images], dtype=np.int64)
    scan.objects_per_image = np.array([len(objects[i]) for i in images], dtype=np.int64)
    return scan, AnnotationIndex(images=images, objects=objects)
