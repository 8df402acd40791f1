"""Read a YOLO detection dataset (the Ultralytics layout): :func:`convert_yolo`.

Class names: ``classes=`` if given, else ``names:`` of the data YAML (a list, or a dict
``{0: name, ...}``), else ``classes.txt`` (one name a line) in the input or its ``labels/``
folder. The YAML (``data.yaml``, ``data.yml`` or ``dataset.yaml`` in the input folder, or the
input itself) gives ``train:`` and ``val:`` (a folder, a ``.txt`` list of image paths relative
to the list, or a list of those) relative to ``path:`` (relative to the YAML's folder; the
YAML's folder when absent or not a folder); ``test:`` is not converted. Without a YAML:
``images/{train,val}/``, ``images/`` or the input folder itself.

The label of ``.../images/.../a.jpg`` is ``.../labels/.../a.txt`` (the last ``images`` folder
below the dataset root replaced), or ``a.txt`` beside the image where no ``images`` folder
exists. A line is ``class cx cy w h``, the box's center and size normalized by the image's
width and height, so in pixels ``x = (cx - w / 2) * width``, ``y = (cy - h / 2) * height``,
``w * width`` by ``h * height``. An empty label file is an image without objects; exact
repeats of a line are counted skips (as Ultralytics drops them). The data YAML is read with
PyYAML (installed with OmegaConf).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .reading import (
    IMAGE_SUFFIXES,
    SourceImage,
    checked_names,
    fit_box,
    input_folder,
    list_images,
    parse_all,
    read_class_names,
)
from .summary import TRAIN, VAL, ConversionSummary
from .writing import check_output, check_val_fraction, write_dataset

__all__ = ["convert_yolo"]

log = logging.getLogger(__name__)

YOLO_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")


def _yolo_yaml(input_path: Path) -> Path | None:
    if input_path.is_file():
        return input_path
    return next((input_path / n for n in YOLO_YAML_NAMES if (input_path / n).is_file()), None)


def _yaml_names(config: dict[str, Any], path: Path) -> list[str] | None:
    names = config.get("names")
    if names is None:
        return None
    if isinstance(names, dict):
        ids = {str(key).strip(): value for key, value in names.items()}
        if sorted(ids) != sorted(str(i) for i in range(len(names))):
            raise ValueError(
                f"{path}: names: has the keys {sorted(ids)}; a dict of names needs the class "
                f"ids 0..{len(names) - 1} as keys"
            )
        names = [ids[str(i)] for i in range(len(names))]
    elif not isinstance(names, list):
        raise ValueError(f"{path}: names: must be a list of class names or a dict {{id: name}}")
    names = checked_names(names, str(path))
    if "nc" in config and int(config["nc"]) != len(names):
        raise ValueError(
            f"{path}: nc: {config['nc']} but names: lists {len(names)} classes; make them agree"
        )
    return names


def _yaml_entries(value: Any, root: Path, yaml_dir: Path, key: str, path: Path) -> list[Path]:
    """The folders or list files of one ``train:`` / ``val:`` value of a data YAML."""
    entries = []
    for item in value if isinstance(value, list) else [value]:
        candidate = Path(str(item)).expanduser()
        tried = [candidate] if candidate.is_absolute() else [root / candidate]
        if not candidate.is_absolute() and candidate.parts[:1] == ("..",):
            # exports that write "../train/images" beside the dataset's own folders
            tried.append(yaml_dir / Path(*[p for p in candidate.parts if p != ".."]))
        found = next((p for p in tried if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"{path}: {key}: {item} not found (looked for {', '.join(map(str, tried))}); "
                "fix the path, or path: (the dataset root the paths are relative to)"
            )
        entries.append(found)
    return entries


def _entry_images(entry: Path) -> tuple[list[Path], list[Path]]:
    """(images, the folders they lie under) of a folder or a ``.txt`` list of image paths."""
    if entry.is_dir():
        return list_images(entry), [entry]
    images = []
    for line in entry.read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            path = Path(line.strip()).expanduser()
            images.append(path if path.is_absolute() else (entry.parent / path))
    return images, [p.parent for p in images]


def _yolo_layout(
    input_path: Path, classes: Sequence[str] | None
) -> tuple[list[str], dict[str, list[Path]], Path]:
    """Class names, the image folders or list files of each split, and the dataset root."""
    yaml_path = _yolo_yaml(input_path)
    names = None if classes is None else checked_names(classes, "classes=")
    if yaml_path is not None:
        try:
            config = yaml.safe_load(yaml_path.read_text(encoding="utf-8-sig")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{yaml_path} is not valid YAML ({err}); fix the file") from None
        if not isinstance(config, dict):
            raise ValueError(f"{yaml_path} holds no mapping; a data YAML has names:, train:, val:")
        yaml_dir = yaml_path.parent
        root = Path(str(config.get("path") or ".")).expanduser()
        root = root if root.is_absolute() else yaml_dir / root
        if not root.is_dir():
            log.info(
                "%s: path: %s is not a folder; reading paths from %s", yaml_path, root, yaml_dir
            )
            root = yaml_dir
        names = names or _yaml_names(config, yaml_path)
        if config.get("train") is None:
            raise ValueError(f"{yaml_path} has no train: entry; add train: <image folder>")
        splits = {
            split: _yaml_entries(config[split], root, yaml_dir, split, yaml_path)
            for split in (TRAIN, VAL)
            if config.get(split) is not None
        }
        if config.get("test") is not None:
            log.info("%s: the test: split is not converted (train: and val: are)", yaml_path)
    else:
        root = input_path
        images = input_path / "images"
        if (images / TRAIN).is_dir():
            splits = {TRAIN: [images / TRAIN]}
            val = next((images / v for v in ("val", "valid") if (images / v).is_dir()), None)
            splits.update({VAL: [val]} if val is not None else {})
        else:
            splits = {TRAIN: [images if images.is_dir() else input_path]}
    if names is None:
        listed = next(
            (
                p
                for p in (input_path / "classes.txt", input_path / "labels" / "classes.txt")
                if input_path.is_dir() and p.is_file()
            ),
            None,
        )
        if listed is None:
            raise ValueError(
                f"no class names for {input_path}: put a data.yaml with names: [...] or a "
                "classes.txt (one name a line) into it, or pass classes=[name, ...]"
            )
        names = read_class_names(listed)
    return names, splits, root


def _yolo_label_path(image: Path, root: Path) -> Path:
    """The label file of ``image``: its last ``images`` folder below ``root`` becomes
    ``labels``, or beside the image where there is none."""
    try:
        parts, base = list(image.relative_to(root).parts), root
    except ValueError:
        parts, base = list(image.parts), Path(image.anchor)
        parts = parts[1:] if image.anchor else parts
    folders = parts[:-1]
    if "images" in folders:
        index = len(folders) - 1 - folders[::-1].index("images")
        parts[index] = "labels"
    return (base / Path(*parts)).with_suffix(".txt")


def _yolo_sources(splits: dict[str, list[Path]], root: Path) -> dict[str, list[SourceImage]]:
    sources: dict[str, list[SourceImage]] = {}
    owners: dict[Path, Path] = {}
    for split, entries in splits.items():
        images, folders = [], []
        for entry in entries:
            found, under = _entry_images(entry)
            images += found
            folders += under
        images = sorted(set(images))  # a list file may name an image twice
        if not images:
            raise FileNotFoundError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the {split} split: "
                f"{', '.join(map(str, entries))}; point input= at the dataset"
            )
        base = Path(os.path.commonpath([str(f) for f in folders]))
        records = []
        for image in images:
            label = _yolo_label_path(image, root)
            if label in owners and owners[label] != image:
                raise ValueError(
                    f"images {owners[label]} and {image} share the label file {label}; "
                    "rename one of them (labels are found by the image's name)"
                )
            owners[label] = image
            records.append(
                SourceImage(
                    image, image.relative_to(base).as_posix(), label if label.is_file() else None
                )
            )
        sources[split] = sorted(records, key=lambda s: s.file_name)
    return sources


def _read_yolo_label(
    path: Path, width: int, height: int, names: list[str], summary: ConversionSummary
) -> list[tuple[int, tuple[float, float, float, float]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a text file; a YOLO label file holds lines of `class cx cy w h`"
        ) from None
    objects, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(fields) != 5 or len(values) != 5 or not all(map(math.isfinite, values)):
            raise ValueError(
                f"{where}: {line.strip()!r} is not a YOLO box (5 numbers: class cx cy w h, the "
                "center and size normalized to [0, 1]); segmentation or pose labels hold more: "
                "export boxes, or fix the line"
            )
        label = values[0]
        if not (label.is_integer() and 0 <= label < len(names)):
            raise ValueError(
                f"{where}: class {fields[0]} is not one of the {len(names)} class ids "
                f"0..{len(names) - 1}; add the missing names (names: of the data YAML, "
                "classes.txt or classes=), or fix the line"
            )
        if tuple(values) in seen:
            summary.skip("duplicate_box", where)
            continue
        seen.add(tuple(values))
        cx, cy, w, h = values[1:]
        box = fit_box(
            (cx - w / 2) * width,
            (cy - h / 2) * height,
            (cx + w / 2) * width,
            (cy + h / 2) * height,
            width,
            height,
            where,
            summary,
        )
        if box is not None:
            objects.append((int(label), box))
    return objects


def convert_yolo(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    copy_images: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Write the YOLO dataset at ``input_path`` (a folder, or its data YAML) as a COCO dataset
    in ``output``; return what was written and left out. The layouts read: the module
    docstring; what is written: :mod:`.writing`; errors and skips: :mod:`.summary`.
    ``progress`` shows a bar on stderr."""
    source = input_folder(input_path)
    given = Path(input_path).expanduser()
    names, split_entries, root = _yolo_layout(given if given.is_file() else source, classes)
    roots = [source, root, *(e for entries in split_entries.values() for e in entries)]
    output = check_output(output, roots, overwrite)
    check_val_fraction(val_fraction, split_entries)
    summary = ConversionSummary("yolo", source, output, copy_images, categories=names)
    sources = _yolo_sources(split_entries, root)

    def parse(item: SourceImage, width: int, height: int) -> list:
        if item.label is None:
            return []
        return _read_yolo_label(item.label, width, height, names, summary)

    parsed = parse_all(sources, parse, summary, progress)
    write_dataset(summary, parsed, val_fraction, seed, overwrite, progress)
    return summary
