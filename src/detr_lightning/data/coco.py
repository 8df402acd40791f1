"""COCO-format detection dataset: an image directory plus an ``instances_*.json`` file.

All checks that can fail for a whole run happen at construction, before any training step:
missing files, unparsable JSON, unknown categories, images listed but absent on disk, and
boxes outside their image (clamped, dropped when empty, reported in one warning). Labels are
checked against the label map here, once, so no training step needs to look at them again.
The JSON-level checks are :func:`~detr_lightning.data.annotations.scan_annotations`, shared
with the dataset report (``detr-validate``).

The only per-sample failure is an image that does not decode. One bad file out of 118k should
not stop a multi-day run, and under DDP a rank must never skip a step that the other ranks run:
so the sample is replaced by the next readable image of the dataset, and its target says which
image it stands in for (``stand_in_for``), so that training can count it and evaluation can
score the unreadable image as having no detections. A warning names each such file once.
"""

from __future__ import annotations

import json
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
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from .annotations import AnnotationScan, BoxIssue, scan_annotations
from .labels import LabelMap
from .transforms import boxes_to_normalized_cxcywh

__all__ = ["CocoDetection", "load_coco_json"]

log = logging.getLogger(__name__)


def load_coco_json(annotation_file: str | os.PathLike) -> dict[str, Any]:
    """Parse a COCO instances file, with errors that name the file and the fix."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {path} does not exist; point the annotation path at a COCO "
            "instances JSON (e.g. annotations/instances_val2017.json under the dataset root)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"annotation file {path} is not valid JSON ({err}); re-download or regenerate it"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(
            f"annotation file {path} holds a {type(data).__name__}, not a COCO dict with "
            "'images', 'annotations' and 'categories'; is it a results file?"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"annotation file {path} has no '{key}' list; a COCO instances file needs "
                "'images', 'annotations' and 'categories'"
            )
    data.setdefault("annotations", [])
    return data


@dataclass
class _ImageRecord:
    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # [n, 4] float32 xyxy, clamped to the image
    labels: np.ndarray  # [n] int64


JPEG_REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes at directly (1/8, 1/4, 1/2)
JPEG_SUFFIXES = (".jpg", ".jpeg")


def jpeg_reduction(path: Path, height: int, width: int, short_side: int | None) -> int:
    """The largest JPEG decode reduction (1, 2, 4 or 8) that keeps the short side of the
    (height, width) file ``path`` at least ``short_side`` pixels (1: full size, also for
    ``short_side=None`` and files that are not JPEGs)."""
    if short_side is None or path.suffix.lower() not in JPEG_SUFFIXES:
        return 1
    return next((k for k in JPEG_REDUCTIONS if min(height, width) // k >= short_side), 1)


def reduced_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The (height, width) libjpeg decodes a file at when reducing it by ``factor``."""
    return -(-height // factor), -(-width // factor)


def _read_rgb(path: Path, short_side: int | None = None) -> tuple[Tensor, tuple[int, int]]:
    """Decode an image file to uint8 [3, H, W] RGB (grey and RGBA converted), and the file's
    own (height, width).

    With ``short_side``, a JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale
    (:func:`jpeg_reduction`; libjpeg scales in the DCT, which is both an antialiased
    downsample and several times faster than a full decode): training at small sizes from
    photo-sized files then decodes and resizes a fraction of the pixels."""
    if short_side is not None and path.suffix.lower() in JPEG_SUFFIXES:
        with Image.open(path) as image:
            width, height = image.size
            factor = jpeg_reduction(path, height, width, short_side)
            if image.format == "JPEG" and factor > 1:
                image.draft("RGB", reduced_size(width, height, factor))
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                # np.asarray shares PIL's read-only buffer; tensors must own writable memory
                pixels = torch.from_numpy(np.array(rgb))
                return pixels.permute(2, 0, 1), (height, width)
    image = read_rgb(path)
    return image, (int(image.shape[-2]), int(image.shape[-1]))


# What decoding a broken image file raises (torchvision or PIL).
DECODE_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError)


def read_rgb(path: Path) -> Tensor:
    """Decode an image file to uint8 [3, H, W] RGB as training reads it (grey and RGBA
    converted, no EXIF rotation: annotations refer to the stored pixels)."""
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:
        # formats torchvision cannot decode (BMP, TIFF, ...): let PIL try
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("RGB"))


def missing_image_files(image_dir: Path, file_names: list[str]) -> list[str]:
    """The names of ``file_names`` (relative to ``image_dir``) that are not files there."""
    # One directory listing instead of one stat per image (118k for COCO train).
    with os.scandir(image_dir) as it:
        present = {e.name for e in it}
    return [name for name in file_names if not (name in present or (image_dir / name).is_file())]


def transform_sample(
    image: Tensor, target: dict[str, Any], transforms: Callable[..., Any] | None
) -> tuple[Tensor, dict[str, Any]]:
    """A decoded sample through ``transforms``: image uint8 [3, H, W], target ``boxes``
    (XYXY ``BoundingBoxes``), ``labels`` and optionally ``masks`` (``tv_tensors.Mask``) ->
    the float image [3, H', W'] and ``boxes`` (normalized cxcywh), ``labels`` int64,
    ``masks`` bool (if given) and ``size`` [2] = (H', W'). Without transforms the image is
    only scaled to [0, 1]."""
    image = tv_tensors.Image(image)
    if transforms is not None:
        image, target = transforms(image, target)
    else:
        image = F.to_dtype(image, torch.float32, scale=True)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    result = {
        "boxes": boxes_to_normalized_cxcywh(target["boxes"], size),
        "labels": target["labels"].as_subclass(Tensor).to(torch.int64),
    }
    if "masks" in target:
        result["masks"] = target["masks"].as_subclass(Tensor).to(torch.bool)
    result["size"] = torch.tensor(size, dtype=torch.int64)
    return image.as_subclass(Tensor), result


def _seeded(seed: int, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with torch's CPU generator seeded by ``seed``; the caller's random
    state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also queues a seed per accelerator,
        # recording a stack trace each time (~1 ms a sample)
        torch.default_generator.manual_seed(seed)
        return function(*args)


class CocoDetection(Dataset):
    """Detection samples from a COCO image directory and instances JSON.

    Each item is ``(image, target)``:

    - image: float32 [3, H, W], the output of ``transforms`` (uint8 to [0, 1] without them).
    - target["boxes"]: float32 [n, 4] cxcywh normalized by the transformed (H, W).
    - target["labels"]: int64 [n] class labels from ``label_map`` (contiguous by default).
    - target["image_id"]: int, the COCO image id.
    - target["orig_size"]: int64 [2] (h, w) of the file; target["size"]: int64 [2] (H, W).
    - target["stand_in_for"]: the image id of an unreadable image this sample replaces, or -1.

    ``transforms`` is called as ``transforms(image, {"boxes": ..., "labels": ...})`` with a uint8
    ``tv_tensors.Image`` and XYXY ``tv_tensors.BoundingBoxes`` (see ``presets``). Crowd regions
    (``iscrowd=1``) are not objects to detect and are left out of the targets, as in the
    official code; COCO evaluation reads them from the annotation file. Boxes overshooting their
    image are clamped and empty ones dropped with one summary warning; ``strict=True`` makes that
    a ``ValueError`` instead. ``scan`` keeps the file's
    :class:`~detr_lightning.data.annotations.AnnotationScan` (statistics, problems found).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        *,
        transforms: Callable[..., Any] | None = None,
        label_map: LabelMap | None = None,
        label_mapping: str = "contiguous",
        strict: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image directory {self.image_dir} does not exist; it should hold the images "
                f"listed in {self.annotation_file} (e.g. train2017/ or val2017/ under the root)"
            )
        dataset = load_coco_json(self.annotation_file)
        if not dataset["images"]:
            raise ValueError(
                f"annotation file {self.annotation_file} lists no images; a dataset needs at "
                "least one entry in 'images'"
            )
        # The parsed file is large (COCO train: GBs of Python objects, copied into every worker
        # as their reference counts change); samples only need the compact records below.
        self.categories: list[dict[str, Any]] = dataset["categories"]
        self.label_map = label_map or LabelMap.from_coco(dataset, label_mapping)
        self.transforms = transforms
        self.strict = strict
        self.unreadable: set[int] = set()  # indices found undecodable by this process
        self._records = self._build_records(dataset)

    def _build_records(self, dataset: dict[str, Any]) -> list[_ImageRecord]:
        scan, index = scan_annotations(dataset)
        self._raise_on_errors(scan)
        missing = missing_image_files(
            self.image_dir, [e["file_name"] for e in index.images.values()]
        )
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.annotation_file} are missing from "
                f"{self.image_dir}, e.g. {missing[:3]}; check that the image directory matches "
                "the annotation file (train2017 with instances_train2017.json, ...), or remove "
                "those images from the JSON"
            )
        if scan.box_issues:
            self._report_bad_boxes(scan.box_issues)
        self.scan = scan

        records = []
        for image_id, entry in index.images.items():
            objects = index.objects[image_id]
            labels = []
            for *_, cat_id, ann_id in objects:
                try:
                    labels.append(self.label_map.category_to_label(cat_id))
                except ValueError as err:
                    raise ValueError(
                        f"annotation {ann_id} in {self.annotation_file}: {err}"
                    ) from None
            records.append(
                _ImageRecord(
                    image_id=image_id,
                    path=self.image_dir / entry["file_name"],
                    height=int(entry["height"]),
                    width=int(entry["width"]),
                    boxes=np.asarray([o[:4] for o in objects], dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64),
                )
            )
        return records

    def _raise_on_errors(self, scan: AnnotationScan) -> None:
        """The first problem that makes the file unusable, as a ValueError naming it."""
        file = self.annotation_file
        if scan.incomplete_images:
            image, missing = scan.incomplete_images[0]
            raise ValueError(
                f"image entry {image} in {file} lacks {missing}; every image needs id, "
                "file_name, width and height"
            )
        if scan.duplicate_image_ids:
            raise ValueError(
                f"image id {scan.duplicate_image_ids[0]} is listed twice in {file} ('images'); "
                "image ids must be unique"
            )
        more = lambda problems: f" ({len(problems) - 1} more like it)" if len(problems) > 1 else ""
        if scan.unknown_categories:
            ann_id, cat_id = scan.unknown_categories[0]
            raise ValueError(
                f"annotation {ann_id} in {file} has category_id {cat_id}, which is not among "
                f"the file's categories {sorted(scan.categories)}{more(scan.unknown_categories)}; "
                "add the category to 'categories' or fix the annotation"
            )
        if scan.unknown_images:
            ann_id, image_id = scan.unknown_images[0]
            raise ValueError(
                f"annotation {ann_id} in {file} refers to image_id {image_id}, which is not in "
                f"'images'{more(scan.unknown_images)}; remove the annotation or add the image"
            )
        if scan.malformed_boxes:
            ann_id, bbox = scan.malformed_boxes[0]
            raise ValueError(
                f"annotation {ann_id} in {file} has bbox {bbox!r}{more(scan.malformed_boxes)}; "
                "expected [x, y, width, height] in pixels"
            )

    def _report_bad_boxes(self, issues: list[BoxIssue]) -> None:
        flagged = [issue.annotation_id for issue in issues]
        num_dropped = sum(issue.dropped for issue in issues)
        message = (
            f"{len(flagged)} annotation(s) in {self.annotation_file} have boxes outside their "
            f"image or with width/height <= 0 (annotation ids {flagged[:5]}"
            f"{', ...' if len(flagged) > 5 else ''}): {len(flagged) - num_dropped} clamped to "
            f"the image, {num_dropped} left empty and dropped."
        )
        if self.strict:
            raise ValueError(
                message + " Fix these annotations, or set data.strict=false (strict=False in "
                "Python) to clamp them."
            )
        log.warning(
            "%s Fix the annotation file, or set data.strict=true (strict=True in Python) to make "
            "this an error.",
            message,
        )

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [record.image_id for record in self._records]

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index`` (dataset order)."""
        return self._records[index].path

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        """Sample ``key``; a ``(index, seed)`` key runs the random transforms under ``seed``.

        Seeded keys come from :class:`~detr_lightning.data.sampler.EpochSeededSampler` and make
        augmentations independent of workers, ranks and restarts.
        """
        if isinstance(key, tuple):
            index, seed = key
            return _seeded(seed, self._load, index)
        return self._load(key)

    def output_size(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(H, W) that sample ``key`` (as for ``__getitem__``) will have, without decoding it.

        Uses the transforms' ``output_size(height, width)`` when they have one (the training
        augmentation does), under the sample's seed; otherwise the size recorded in the
        annotation file. An image whose file disagrees with its record is only mis-grouped.
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self._records[index]
        predict = getattr(self.transforms, "output_size", None)
        height, width = record.height, record.width
        if predict is None:
            return height, width
        short_side = getattr(self.transforms, "source_short_side", None)  # see _read_rgb
        factor = jpeg_reduction(record.path, height, width, short_side)
        height, width = reduced_size(height, width, factor)
        if seed is None:
            return predict(height, width)
        return _seeded(seed, predict, height, width)

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, used, (orig_h, orig_w) = self._read_readable(index)
        record = self._records[used]
        boxes = torch.from_numpy(record.boxes.copy())
        if (orig_h, orig_w) != (record.height, record.width):
            # the JSON's size was wrong: keep the boxes inside the real image
            boxes[:, 0::2].clamp_(0, orig_w)
            boxes[:, 1::2].clamp_(0, orig_h)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if (height, width) != (orig_h, orig_w):  # decoded at a reduced scale
            boxes *= torch.tensor([width / orig_w, height / orig_h] * 2, dtype=boxes.dtype)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(record.labels.copy()),
        }
        image, result = transform_sample(image, target, self.transforms)
        result.update({
            "image_id": record.image_id,
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "stand_in_for": self._records[index].image_id if used != index else -1,
        })  # fmt: skip
        return image, result

    def _read_readable(self, index: int) -> tuple[Tensor, int, tuple[int, int]]:
        """Decode image ``index``, or else the next readable one: (uint8 [3, H, W], its index,
        the file's (height, width))."""
        short_side = getattr(self.transforms, "source_short_side", None)
        for offset in range(len(self._records)):
            candidate = (index + offset) % len(self._records)
            if candidate in self.unreadable:
                continue
            record = self._records[candidate]
            try:
                image, size = _read_rgb(record.path, short_side)
                return image, candidate, size
            except DECODE_ERRORS as err:
                self.unreadable.add(candidate)
                log.warning(
                    "image %s (image_id %s) does not decode (%s); a readable image stands in "
                    "for it in training, and evaluation counts its objects as missed. Replace "
                    "the file or remove it from %s.",
                    record.path,
                    record.image_id,
                    err,
                    self.annotation_file,
                )
        raise RuntimeError(
            f"no image of {self.annotation_file} in {self.image_dir} decodes; check the files"
        )
