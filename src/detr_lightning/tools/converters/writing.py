"""The COCO dataset that a conversion writes: the output folder's checks, the val split, the
images and the annotation files.

Output (the default paths of ``conf/data/coco.yaml``, so ``data.root=OUTPUT`` needs no other
path setting)::

    OUTPUT/train2017/<images>    OUTPUT/annotations/instances_train2017.json
    OUTPUT/val2017/<images>      OUTPUT/annotations/instances_val2017.json

- Images keep their path below their source folder (a COCO ``file_name`` may hold
  sub-folders). They are copied, or symlinked with ``copy_images=False``; the source is only
  read, and an output folder that overlaps it is refused.
- Categories: ids 1..K in the source's class order (YOLO class ``k`` is category ``k + 1``),
  named from its class names; both files declare all of them.
- Image ids 1..N over the whole source (train then val, each sorted by path, numbered before
  a ``val_fraction`` split, so an image keeps its id whatever the split); annotation ids 1..M.
- Every annotation: ``bbox`` = [x, y, width, height] in pixels of the stored image (no EXIF
  rotation: the pixels training decodes), ``area`` = width * height, ``iscrowd`` = 0.

Splits: a source with train and val keeps them. A source with one split has ``val_fraction``
of its images (0.1 by default; at least one, never all) moved to val, drawn with
``random.Random(seed)``; ``val_fraction=0`` writes no val split.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...utils.io import write_json_atomic
from .reading import ParsedImage, progress_bar
from .summary import (
    ANNOTATION_FILES,
    IMAGE_DIRS,
    SKIPS,
    TRAIN,
    VAL,
    ConversionSummary,
    SplitSummary,
)

__all__ = ["check_output", "check_val_fraction", "write_dataset"]

log = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1


def check_output(output: str | os.PathLike, inputs: Sequence[Path], overwrite: bool) -> Path:
    """The output folder, refused when it overlaps an input or (without ``overwrite``) holds
    anything."""
    output = Path(output).expanduser()
    target = output.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if target == folder or target.is_relative_to(folder) or folder.is_relative_to(target):
            raise ValueError(
                f"output={output} overlaps the source folder {folder}; write the COCO dataset "
                "to a folder outside the source (the source is only read)"
            )
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output={output} is a file; name a folder to write the dataset to")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output={output} is not empty; name a new folder, or pass overwrite=true to replace "
            f"its {IMAGE_DIRS[TRAIN]}/, {IMAGE_DIRS[VAL]}/ and annotation files"
        )
    return output


def check_val_fraction(val_fraction: float | None, splits: dict[str, Any]) -> None:
    """A ValueError unless ``val_fraction`` is unset, or in [0, 1) for a source (``splits``)
    without its own val split."""
    if val_fraction is None:
        return
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: give a fraction in [0, 1)")
    if VAL in splits:
        raise ValueError(
            f"val_fraction={val_fraction}, but the source has its own val split; leave "
            "val_fraction unset to keep it"
        )


def _split_off(
    parsed: dict[str, list[ParsedImage]], val_fraction: float | None, seed: int
) -> dict[str, list[ParsedImage]]:
    """``val_fraction`` of a one-split source's images drawn into val (at least one, not all)."""
    if VAL in parsed:
        return parsed
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    items = parsed[TRAIN]
    count = min(max(1, round(fraction * len(items))), len(items) - 1) if fraction > 0 else 0
    if count <= 0:
        return {TRAIN: items}
    chosen = set(random.Random(seed).sample(range(len(items)), count))
    return {
        TRAIN: [item for i, item in enumerate(items) if i not in chosen],
        VAL: [item for i, item in enumerate(items) if i in chosen],
    }


def _clear(output: Path) -> None:
    """Remove what an earlier conversion wrote into ``output`` (symlinks, not their targets)."""
    for split in (TRAIN, VAL):
        folder = output / IMAGE_DIRS[split]
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)
        (output / ANNOTATION_FILES[split]).unlink(missing_ok=True)


def write_dataset(
    summary: ConversionSummary,
    parsed: dict[str, list[ParsedImage]],
    val_fraction: float | None,
    seed: int,
    overwrite: bool,
    progress: bool,
) -> None:
    """Split, write the images and the annotation files, fill in and log ``summary``."""
    splits = _split_off(parsed, val_fraction, seed)
    output = summary.output
    if overwrite:
        _clear(output)
    output.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(summary.categories)]
    next_annotation = 1
    total = sum(map(len, splits.values()))
    verb = "copying" if summary.copy_images else "linking"
    with progress_bar(progress, total, f"{verb} images") as advance:
        for split, items in splits.items():
            image_dir, annotation_file = summary.paths(split)
            counts = summary.splits[split] = SplitSummary(images=len(items))
            images, annotations = [], []
            for item in items:
                advance()
                target = image_dir / item.source.file_name
                target.parent.mkdir(parents=True, exist_ok=True)
                if summary.copy_images:
                    shutil.copyfile(item.source.image, target)
                else:
                    os.symlink(item.source.image.resolve(), target)
                images.append(
                    {
                        "id": item.image_id,
                        "file_name": item.source.file_name,
                        "width": item.width,
                        "height": item.height,
                    }
                )
                counts.images_without_objects += not item.objects
                for label, (x, y, w, h) in item.objects:
                    annotations.append(
                        {
                            "id": next_annotation,
                            "image_id": item.image_id,
                            "category_id": label + 1,
                            "bbox": [x, y, w, h],
                            "area": round(w * h, 6),
                            "iscrowd": 0,
                        }
                    )
                    next_annotation += 1
                    counts.objects_per_category[summary.categories[label]] += 1
            counts.objects = len(annotations)
            write_json_atomic(
                annotation_file,
                {
                    "info": {
                        "description": f"{summary.format} dataset {summary.source}, converted "
                        "by detr_lightning.tools.converters"
                    },
                    "licenses": [],
                    "images": images,
                    "annotations": annotations,
                    "categories": categories,
                },
            )
    for reason, count in summary.skipped.items():
        log.warning(
            "left out %d: %s (first: %s)", count, SKIPS[reason], summary.examples[reason][0]
        )
