"""Dataset report: the problems of a COCO-format dataset's splits, their statistics, and advice
for training DETR on them.

:func:`check_dataset` is a pure function (no printing; bad data becomes findings, never
exceptions) that returns a :class:`DatasetReport` with advice from
:mod:`detr_lightning.data.advice`. ``python -m detr_lightning.data.validate`` prints it
(:func:`~detr_lightning.data.validate.format_report`), and the data module logs
:func:`summary_line` for each split it builds. The JSON-level checks are
:func:`~detr_lightning.data.annotations.scan_annotations`, the ones CocoDetection runs.

Severities:

- ``error``: training refuses the data, or evaluation would fail or score it wrongly;
- ``warning``: training runs with a repair (boxes clamped or dropped: errors with
  ``strict``, where training refuses them), or the data limits what the model can learn;
- ``info``: worth knowing, nothing to fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detr_lightning.data.advice import TrainingPlan, advise
from detr_lightning.data.annotations import (
    BOX_TOLERANCE,
    EVALUATION_KEYS,
    AnnotationIndex,
    AnnotationScan,
    scan_annotations,
)
from detr_lightning.data.coco import (
    DECODE_ERRORS,
    CocoDetection,
    load_coco_json,
    missing_image_files,
    read_rgb,
)
from detr_lightning.data.labels import LabelMap

__all__ = [
    "ERROR",
    "INFO",
    "WARNING",
    "DatasetReport",
    "Finding",
    "SplitReport",
    "TrainingPlan",
    "annotation_findings",
    "check_dataset",
    "check_split",
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


@dataclass
class DatasetReport:
    """Every split's report, the findings across splits, and advice derived from them."""

    splits: list[SplitReport]
    dataset_findings: list[Finding] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        """All findings, errors first."""
        found = [f for split in self.splits for f in split.findings] + self.dataset_findings
        return sorted(found, key=lambda f: SEVERITIES.index(f.severity))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def split(self, name: str) -> SplitReport:
        return next(s for s in self.splits if s.name == name)


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


def _decode_all(
    entries: list[dict[str, Any]],
    image_dir: Path,
    workers: int | None,
    progress: Callable[[int], Any] | None,
) -> list[tuple[dict[str, Any], tuple[int, int] | str]]:
    """Decode every image as training does: (entry, (height, width) or the error text)."""

    def decode(entry: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int] | str]:
        try:
            image = read_rgb(image_dir / entry["file_name"])
        except DECODE_ERRORS as err:
            return entry, (str(err).strip().splitlines() or [type(err).__name__])[0]
        return entry, (int(image.shape[-2]), int(image.shape[-1]))

    workers = workers or min(8, os.cpu_count() or 1)
    results = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(decode, entries):
            results.append(result)
            if progress is not None:
                progress(1)
    return results


def _file_findings(
    name: str,
    image_dir: Path,
    annotation_file: Path,
    index: AnnotationIndex,
    *,
    decode: bool,
    decode_workers: int | None,
    progress: bool,
) -> list[Finding]:
    if not image_dir.is_dir():
        message = (
            f"image directory {image_dir} does not exist; it should hold the images listed in "
            f"{annotation_file} (set data.{name}_images=...)"
        )
        return [Finding(ERROR, name, "image_dir_missing", message, [str(image_dir)])]
    entries = list(index.images.values())
    missing = set(missing_image_files(image_dir, [e["file_name"] for e in entries]))
    findings = []
    if missing:
        findings.append(
            Finding(
                ERROR,
                name,
                "missing_file",
                f"images listed in {annotation_file} are missing from {image_dir}: training "
                "refuses the split; add the files or remove them from the JSON",
                [
                    f"{e['file_name']} (image {e['id']})"
                    for e in entries
                    if e["file_name"] in missing
                ],
            )
        )
    if not decode:
        return findings
    present = [e for e in entries if e["file_name"] not in missing]
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"decoding {name} images", total=len(present))
            results = _decode_all(
                present, image_dir, decode_workers, lambda n: bar.advance(task, n)
            )
    else:
        results = _decode_all(present, image_dir, decode_workers, None)
    broken, resized = [], []
    for entry, outcome in results:
        label = f"{entry['file_name']} (image {entry['id']})"
        if isinstance(outcome, str):
            broken.append(f"{label}: {outcome}")
        elif outcome != (int(entry["height"]), int(entry["width"])):
            resized.append(
                f"{label}: 'images' says {entry['width']}x{entry['height']}, the file is "
                f"{outcome[1]}x{outcome[0]}"
            )
    if broken:
        findings.append(
            Finding(
                ERROR,
                name,
                "undecodable",
                "images that do not decode: training substitutes another image for each, and "
                "evaluation counts their objects as missed; replace the files or remove them "
                f"from {annotation_file}",
                broken,
            )
        )
    if resized:
        findings.append(
            Finding(
                WARNING,
                name,
                "size_mismatch",
                "images whose decoded size differs from their width/height in the JSON: boxes "
                "are checked against the wrong size and clamped to the real one; fix the entries",
                resized,
            )
        )
    return findings


def check_split(
    name: str,
    image_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    *,
    label_mapping: str = "contiguous",
    strict: bool = False,
    evaluated: bool = False,
    decode: bool = True,
    decode_workers: int | None = None,
    progress: bool = False,
) -> SplitReport:
    """Report of one split: the JSON checks, the image files, and with ``decode`` every image.

    ``decode_workers`` threads decode (None: the CPU count, at most 8); ``progress`` shows a
    progress bar on stderr. Never raises for bad data.
    """
    image_dir, annotation_file = Path(image_dir), Path(annotation_file)
    report = SplitReport(name, image_dir, annotation_file, scan=None)
    try:
        dataset = load_coco_json(annotation_file)
    except (FileNotFoundError, ValueError) as err:
        report.findings.append(
            Finding(ERROR, name, "annotation_file", str(err), [str(annotation_file)])
        )
        return report
    try:
        LabelMap.from_coco(dataset, label_mapping)
    except ValueError as err:
        message = f"{annotation_file}: {err}"
        report.findings.append(Finding(ERROR, name, "categories", message, [str(annotation_file)]))
    report.scan, index = scan_annotations(dataset)
    del dataset
    report.findings += annotation_findings(
        name, report.scan, annotation_file, strict=strict, evaluated=evaluated
    )
    report.findings += _file_findings(
        name,
        image_dir,
        annotation_file,
        index,
        decode=decode,
        decode_workers=decode_workers,
        progress=progress,
    )
    report.decoded = decode and image_dir.is_dir()
    return report


def split_report(name: str, dataset: CocoDetection, *, evaluated: bool = False) -> SplitReport:
    """The JSON-level report of a built dataset (its scan; nothing is read again)."""
    findings = annotation_findings(
        name, dataset.scan, dataset.annotation_file, strict=dataset.strict, evaluated=evaluated
    )
    return SplitReport(name, dataset.image_dir, dataset.annotation_file, dataset.scan, findings)


def _object_findings(split: SplitReport, num_queries: int) -> list[Finding]:
    scan = split.scan
    if scan is None:
        return []
    crowded = scan.objects_per_image > num_queries
    items = [
        f"image {image_id}: {count} objects"
        for image_id, count in zip(
            scan.image_ids[crowded].tolist(), scan.objects_per_image[crowded].tolist()
        )
    ]
    if not items:
        return []
    consequence = "never learned" if split.name == "train" else "always missed"
    message = (
        f"images with more objects than the model's {num_queries} queries (model.num_queries): "
        f"matching pairs each query with one object, so the rest are {consequence}"
    )
    return [Finding(WARNING, split.name, "too_many_objects", message, items)]


def _category_findings(train: SplitReport, val: SplitReport) -> list[Finding]:
    if train.scan is None or val.scan is None:
        return []
    ours, theirs = train.scan.categories, val.scan.categories
    if ours == theirs:
        return []
    items = [
        f"category {c}: train {ours.get(c, '-')!r}, val {theirs.get(c, '-')!r}"
        for c in sorted(set(ours) | set(theirs))
        if ours.get(c) != theirs.get(c)
    ]
    message = (
        f"the categories of {train.annotation_file} differ from those of "
        f"{val.annotation_file}: training refuses them; both splits must declare the same "
        "'categories' (ids and names)"
    )
    return [Finding(ERROR, None, "categories_differ", message, items)]


def check_dataset(
    train: tuple[str | os.PathLike, str | os.PathLike] | None,
    val: tuple[str | os.PathLike, str | os.PathLike],
    *,
    plan: TrainingPlan | None = None,
    decode: bool = True,
    decode_workers: int | None = None,
    progress: bool = False,
) -> DatasetReport:
    """Report of a dataset: ``train`` and ``val`` are (image directory, annotation file); the
    training split may be None (evaluation data). See :func:`check_split`."""
    plan = plan or TrainingPlan()
    splits = []
    for name, paths in (("train", train), ("val", val)):
        if paths is None:
            continue
        splits.append(
            check_split(
                name,
                *paths,
                label_mapping=plan.label_mapping,
                strict=plan.strict,
                evaluated=name == "val",
                decode=decode,
                decode_workers=decode_workers,
                progress=progress,
            )
        )
    report = DatasetReport(splits)
    for split in splits:
        split.findings += _object_findings(split, plan.num_queries)
    if train is not None:
        report.dataset_findings += _category_findings(*splits)
    report.advice = advise({s.name: s.scan for s in splits if s.scan is not None}, plan)
    return report


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
