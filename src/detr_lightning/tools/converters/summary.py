"""What a conversion wrote, left out and noted: :class:`ConversionSummary`, and
:func:`format_summary`, its text.

What is an error and what a counted skip. Errors (``ValueError``, ``FileNotFoundError``,
``FileExistsError``; each names the file and the fix; nothing is written): a missing input
folder, no class names, a YOLO line without 5 numbers or with a class id outside the names,
an unparsable XML or an ``<object>`` without ``<name>`` or numeric ``<bndbox>``, an unknown VOC
class with ``classes=`` given, two images sharing a label file, a non-empty output without
``overwrite=True``. Counted skips, each listed in the summary (:data:`SKIPS`) and logged once
per reason: unreadable images, labels without an image, boxes with a width or height <= 0,
boxes beyond their image by more than ``BOX_TOLERANCE`` (1 px, the dataset check's tolerance:
un-normalized YOLO coordinates land here), exact repeats of a YOLO line (as Ultralytics drops
them). Boxes beyond their image by at most 1 px are clipped to it (:data:`NOTES`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...data.annotations import BOX_TOLERANCE

__all__ = [
    "ANNOTATION_FILES",
    "IMAGE_DIRS",
    "NOTES",
    "SKIPS",
    "TRAIN",
    "VAL",
    "ConversionSummary",
    "SplitSummary",
    "format_summary",
]

TRAIN, VAL = "train", "val"
# conf/data/coco.yaml's default paths under data.root
IMAGE_DIRS = {TRAIN: "train2017", VAL: "val2017"}
ANNOTATION_FILES = {
    TRAIN: "annotations/instances_train2017.json",
    VAL: "annotations/instances_val2017.json",
}
MAX_EXAMPLES = 20  # items kept per skip or note reason

# What is left out: reason -> what it is and what happened.
SKIPS = {
    "unreadable_image": "images that PIL cannot open (corrupt, or not an image): left out "
    "with their labels; replace or delete the files",
    "missing_image": "label files whose image was not found: left out; add the image or "
    "delete the label file",
    "outside_image": f"boxes beyond their image by more than {BOX_TOLERANCE:g} px: left out "
    "(YOLO: are the coordinates normalized to [0, 1]?); fix the labels",
    "empty_box": "boxes with a width or height <= 0: left out",
    "duplicate_box": "YOLO lines repeated in the same label file: the repeats left out",
    "difficult": "VOC objects marked difficult: left out (difficult=skip)",
    "unknown_class": "VOC objects of a class not in the class list: left out "
    "(unknown_classes=skip)",
}
# What was repaired, or is worth knowing: reason -> what it is.
NOTES = {
    "no_label_file": "images without a label file: kept, without objects",
    "clipped": f"boxes beyond their image by at most {BOX_TOLERANCE:g} px: clipped to it",
    "difficult_kept": "VOC objects marked difficult: kept as ordinary objects (iscrowd 0)",
    "size_mismatch": "VOC files whose <size> differs from the image file's header: the file's "
    "size was used",
    "exif_rotated": "images with an EXIF rotation: boxes are placed on the stored pixels, as "
    "training reads them; if the labeling tool showed these images rotated, check their boxes",
}


@dataclass
class SplitSummary:
    """What one written split holds."""

    images: int = 0
    objects: int = 0
    images_without_objects: int = 0
    objects_per_category: Counter = field(default_factory=Counter)  # category name -> count


@dataclass
class ConversionSummary:
    """What a conversion wrote, left out (:data:`SKIPS`) and noted (:data:`NOTES`)."""

    format: str  # "yolo" or "voc"
    source: Path
    output: Path
    copy_images: bool
    categories: list[str] = field(default_factory=list)  # names of category ids 1..K
    splits: dict[str, SplitSummary] = field(default_factory=dict)  # written splits
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    notes: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first items

    def paths(self, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file) of ``split`` ("train" or "val") in the output."""
        return self.output / IMAGE_DIRS[split], self.output / ANNOTATION_FILES[split]

    def skip(self, reason: str, item: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, item)

    def note(self, reason: str, item: str) -> None:
        self.notes[reason] += 1
        self._example(reason, item)

    def _example(self, reason: str, item: str) -> None:
        items = self.examples.setdefault(reason, [])
        if len(items) < MAX_EXAMPLES:
            items.append(item)


def format_summary(summary: ConversionSummary, max_examples: int = 10) -> str:
    """The summary as text: the categories, images and objects per split, then what was left
    out and the notes, each with its first ``max_examples`` items."""
    how = "copied" if summary.copy_images else "symlinked"
    lines = [
        f"converted the {summary.format} dataset {summary.source} into {summary.output} "
        f"(images {how})",
        "categories: " + ", ".join(f"{i + 1} {n}" for i, n in enumerate(summary.categories)),
    ]
    for split in (TRAIN, VAL):
        if split not in summary.splits:
            lines.append(
                f"{split}: not written (no images: val_fraction=0, or too few to split); training "
                "and detr-validate need a val split: set data.val_images= and data.val_annotations="
            )
            continue
        counts = summary.splits[split]
        per_category = ", ".join(
            f"{name} {counts.objects_per_category[name]}" for name in summary.categories
        )
        lines.append(
            f"{split}: {counts.images} images ({counts.images_without_objects} without objects), "
            f"{counts.objects} objects ({per_category})"
        )
    for title, counter, meanings in (
        ("left out", summary.skipped, SKIPS),
        ("notes", summary.notes, NOTES),
    ):
        if not counter:
            continue
        lines.append(f"{title}:")
        for reason, count in counter.items():
            lines.append(f"  {count} x {meanings[reason]}")
            items = summary.examples.get(reason, [])[:max_examples]
            lines += [f"      {item}" for item in items]
            if count > len(items):
                lines.append(f"      ... and {count - len(items)} more")
    return "\n".join(lines)
