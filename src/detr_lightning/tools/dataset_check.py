"""Check a COCO-format dataset before training: :func:`check_dataset` reports the problems
of both splits (every image decoded as training reads it), their statistics and advice for
training DETR on them; :func:`format_report` prints it. ``detr-validate`` is the command
(:mod:`detr_lightning.cli.validate`).

:func:`check_dataset` is a pure function (no printing; bad data becomes findings, never
exceptions): the findings are :mod:`detr_lightning.data.checks`'s, the advice
:mod:`detr_lightning.tools.advice`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.annotations import LARGE_AREA, SMALL_AREA, AnnotationIndex, scan_annotations
from ..data.checks import (
    ERROR,
    INFO,
    SEVERITIES,
    WARNING,
    Finding,
    SplitReport,
    annotation_findings,
    plural,
)
from ..data.coco import DECODE_ERRORS, load_coco_json, missing_image_files, read_rgb
from ..data.labels import LabelMap
from .advice import TrainingPlan, advise

__all__ = ["DatasetReport", "TrainingPlan", "check_dataset", "check_split", "format_report"]


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


# ------------------------------------------------------------------------------ printing
# ------------------------------------------------------------------------------ printing
_SEVERITY_TITLES = {ERROR: "error", WARNING: "warning", INFO: "note"}


_SIZE_NAMES = {
    "small": f"small (< {math.isqrt(SMALL_AREA)}^2)",
    "medium": "medium",
    "large": f"large (> {math.isqrt(LARGE_AREA)}^2)",
}


HISTOGRAM_WIDTH = 20  # characters of the longest bar


def _split_lines(split: SplitReport) -> list[str]:
    lines = [f"{split.name}: {split.image_dir}  +  {split.annotation_file}"]
    scan = split.scan
    if scan is None:
        return [*lines, "  (annotation file not readable)"]
    per_image = scan.objects_per_image
    mean = float(per_image.mean()) if len(per_image) else 0.0
    lines.append(
        f"  {scan.num_images} images ({len(scan.images_without_annotations())} without "
        f"annotations), {scan.num_annotations} annotations ({scan.num_crowd} crowd), "
        f"{scan.num_objects} objects; per image mean {mean:.1f}, max "
        f"{int(per_image.max(initial=0))}; images "
        + ("decoded" if split.decoded else "not decoded (decode=false)")
    )
    width = max([len(f"{c} {n}") for c, n in scan.categories.items()] + [26])
    if scan.categories:
        most = max(scan.instances.values(), default=0) or 1
        lines.append(f"  {'category':<{width}}  {'objects':>8}  {'images':>7}")
        for cat_id in sorted(scan.categories):
            label = f"{cat_id} {scan.categories[cat_id]}"
            count = scan.instances[cat_id]
            bar = "#" * math.ceil(HISTOGRAM_WIDTH * count / most)
            images = scan.images_per_category[cat_id]
            lines.append(f"  {label:<{width}}  {count:>8}  {images:>7}  {bar}".rstrip())
    sizes = scan.size_counts()
    total = sum(sizes.values())
    if total:
        lines.append(f"  {'box area (px, COCO ranges)':<{width}}  {'objects':>8}")
        for key, count in sizes.items():
            bar = "#" * math.ceil(HISTOGRAM_WIDTH * count / max(sizes.values()))
            share = f"{count / total:.0%}"
            lines.append(f"  {_SIZE_NAMES[key]:<{width}}  {count:>8}  {share:>7}  {bar}".rstrip())
    return lines


def format_report(report: DatasetReport, max_examples: int = 10) -> str:
    """The report as text: per split its numbers and histograms (objects and images per
    category, objects per COCO size range), then the findings (each with its first
    ``max_examples`` items and the count of the rest), the advice and the verdict."""
    lines: list[str] = []
    for split in report.splits:
        lines += [*_split_lines(split), ""]
    findings = report.findings
    if findings:
        lines.append("findings:")
        for finding in findings:
            where = f"[{finding.split}] " if finding.split else ""
            title = _SEVERITY_TITLES[finding.severity]
            lines.append(f"  {title:<7} {where}{len(finding.items)} x {finding.message}")
            lines += [f"            {item}" for item in finding.items[:max_examples]]
            if len(finding.items) > max_examples:
                lines.append(f"            ... and {len(finding.items) - max_examples} more")
        lines.append("")
    if report.advice:
        lines += ["advice:", *(f"  - {text}" for text in report.advice), ""]
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append(
        f"{'FAILED' if counts[ERROR] else 'OK'}: {plural(counts[ERROR], 'error')}, "
        f"{plural(counts[WARNING], 'warning')}, {plural(counts[INFO], 'note')}"
    )
    return "\n".join(lines)
