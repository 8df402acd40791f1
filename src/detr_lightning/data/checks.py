"""Findings about a COCO-format split: what is wrong, its consequence and the fix.

:func:`annotation_findings` turns the JSON-level scan of a split
(:func:`~detr_lightning.data.annotations.scan_annotations`, the checks CocoDetection runs) into
:class:`Finding` objects, and :func:`summary_line` sums a split up in one line, which the data
module logs for each split it builds. The whole-dataset check with image decoding, statistics
and advice is :mod:`detr_lightning.tools.dataset_check` (``detr-validate``).

Severities:

- ``error``: training refuses the data, or evaluation would fail or score it wrongly;
- ``warning``: training runs with a repair (boxes clamped or dropped: errors with
  ``strict``, where training refuses them), or the data limits what the model can learn;
- ``info``: worth knowing, nothing to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .annotations import BOX_TOLERANCE, EVALUATION_KEYS, AnnotationScan
from .coco import CocoDetection

__all__ = [
    "ERROR",
    "INFO",
    "SEVERITIES",
    "WARNING",
    "Finding",
    "SplitReport",
    "annotation_findings",
    "plural",
    "split_report",
    "summary_line",
]

ERROR, WARNING, INFO = "error", "warning", "info"


SEVERITIES = (ERROR, WARNING, INFO)


@dataclass
class Finding:
    """One kind of problem in one split: what is wrong, its consequence and the fix, and every
    annotation, image or file that has it (each item starts with its id or file name)."""

    severity: str  # ERROR, WARNING or INFO
    split: str | None  # "train", "val", or None for the dataset as a whole
    code: str  # stable name of the check, e.g. "missing_file"
    message: str
    items: list[str] = field(default_factory=list)


@dataclass
class SplitReport:
    """One split: its files, its :class:`AnnotationScan` (None when the file does not parse)
    and its findings. ``decoded``: whether every image was decoded."""

    name: str
    image_dir: Path
    annotation_file: Path
    scan: AnnotationScan | None
    findings: list[Finding] = field(default_factory=list)
    decoded: bool = False


# ------------------------------------------------------------------------------- checks
def _bbox_text(bbox: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in bbox) + "]"


def annotation_findings(
    name: str,
    scan: AnnotationScan,
    annotation_file: Path,
    *,
    strict: bool = False,
    evaluated: bool = False,
) -> list[Finding]:
    """Findings of the JSON-level checks. ``evaluated``: the split is scored by COCO
    evaluation (the validation split), which needs more of each annotation."""
    findings: list[Finding] = []

    def add(severity: str, code: str, message: str, items: list[str]) -> None:
        if items:
            findings.append(Finding(severity, name, code, message, items))

    if scan.num_images == 0 and not scan.incomplete_images and not scan.duplicate_image_ids:
        add(ERROR, "no_images", f"{annotation_file} lists no images", [str(annotation_file)])
    add(
        ERROR,
        "incomplete_image",
        "image entries without id, file_name, width or height: training refuses the file",
        [f"image {image}: lacks {keys}" for image, keys in scan.incomplete_images],
    )
    add(
        ERROR,
        "duplicate_image_id",
        "image ids listed more than once in 'images': training refuses the file; make ids unique",
        [f"image {image_id}" for image_id in scan.duplicate_image_ids],
    )
    declared = sorted(scan.categories)
    add(
        ERROR,
        "unknown_category",
        f"annotations whose category_id is not among the file's categories "
        f"{declared[:20]}{' ...' if len(declared) > 20 else ''}: training refuses the file; "
        "add the category to 'categories' or fix the annotations",
        [f"annotation {ann}: category_id {cat}" for ann, cat in scan.unknown_categories],
    )
    add(
        ERROR,
        "unknown_image",
        "annotations whose image_id is not in 'images': training refuses the file; remove the "
        "annotations or add the images",
        [f"annotation {ann}: image_id {image}" for ann, image in scan.unknown_images],
    )
    add(
        ERROR,
        "malformed_bbox",
        "annotations whose bbox is not [x, y, width, height] (4 finite numbers): training "
        "refuses the file",
        [f"annotation {ann}: bbox {bbox!r}" for ann, bbox in scan.malformed_boxes],
    )
    box_severity = ERROR if strict else WARNING
    repair = (
        "with data.strict=true training refuses the file"
        if strict
        else "data.strict=true makes training refuse them"
    )
    add(
        box_severity,
        "empty_box",
        f"boxes with width or height <= 0: training drops them ({repair}); fix or remove "
        "these annotations",
        [
            f"annotation {i.annotation_id} (image {i.image_id}): bbox {_bbox_text(i.bbox)}"
            for i in scan.box_issues
            if i.nonpositive
        ],
    )
    add(
        box_severity,
        "box_outside_image",
        f"boxes beyond their image by more than {BOX_TOLERANCE:g} px (its width x height in "
        f"'images'): training clamps them to the image and drops those left empty ({repair})",
        [
            f"annotation {i.annotation_id} (image {i.image_id}, {i.image_size[0]}x"
            f"{i.image_size[1]}): bbox {_bbox_text(i.bbox)}"
            for i in scan.box_issues
            if i.outside and not i.nonpositive
        ],
    )
    if evaluated:
        add(
            ERROR,
            "duplicate_annotation_id",
            "annotation ids used more than once: COCO evaluation (pycocotools) indexes "
            "annotations by id, so it scores one of them twice and loses the other; make ids "
            "unique",
            [f"annotation {ann}" for ann in scan.duplicate_annotation_ids],
        )
        add(
            ERROR,
            "evaluation_keys",
            f"annotations without {'/'.join(EVALUATION_KEYS)}: COCO evaluation (pycocotools) "
            "fails with a KeyError at the first validation; add them (area: the box's "
            "width * height when there are no masks; iscrowd: 0)",
            [f"annotation {ann}: lacks {keys}" for ann, keys in scan.lacking_evaluation_keys],
        )
    else:
        add(
            WARNING,
            "duplicate_annotation_id",
            "annotation ids used more than once: training does not mind, but COCO evaluation "
            "on this file would lose annotations; make ids unique",
            [f"annotation {ann}" for ann in scan.duplicate_annotation_ids],
        )
    unused = [c for c in declared if scan.instances[c] == 0]
    if scan.num_objects:
        add(
            WARNING if not evaluated else INFO,
            "category_without_objects",
            "categories without any object in this split: "
            + (
                "their AP is not measured"
                if evaluated
                else "the model cannot learn them; annotate some or remove the category"
            ),
            [f"category {c} ({scan.categories[c]})" for c in unused],
        )
    empty = scan.images_without_annotations()
    add(
        INFO,
        "no_annotations",
        "images without usable annotations (annotations reported as errors do not count): "
        "they teach the model 'no object' only",
        [f"image {image_id}" for image_id in empty],
    )
    return findings


def split_report(name: str, dataset: CocoDetection, *, evaluated: bool = False) -> SplitReport:
    """The JSON-level report of a built dataset (its scan; nothing is read again)."""
    findings = annotation_findings(
        name, dataset.scan, dataset.annotation_file, strict=dataset.strict, evaluated=evaluated
    )
    return SplitReport(name, dataset.image_dir, dataset.annotation_file, dataset.scan, findings)


# ------------------------------------------------------------------------------ summary
def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def summary_line(split: SplitReport) -> str:
    """One line: the split's size and its findings by kind."""
    scan = split.scan
    if scan is None:
        head = f"{split.name}: {split.annotation_file} could not be read"
    else:
        head = (
            f"{split.name}: {scan.num_images} images "
            f"({len(scan.images_without_annotations())} without annotations), "
            f"{scan.num_objects} objects of {len(scan.categories)} categories, up to "
            f"{int(scan.objects_per_image.max(initial=0))} per image"
        )
    problems = [f for f in split.findings if f.severity != INFO]
    if not problems:
        return head
    kinds = ", ".join(f"{f.code} {len(f.items)}" for f in problems)
    return f"{head}; {plural(len(problems), 'problem')} ({kinds})"
