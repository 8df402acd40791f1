"""Read a Pascal VOC detection dataset: :func:`convert_voc`.

Layouts: ``Annotations/*.xml`` with images in ``JPEGImages/`` and splits from
``ImageSets/Main/{train_set,val_set}.txt`` (one split when only one of them exists, all the
images when neither does), or a folder of images with an XML of the same name beside each. An
XML is paired with the image of its name (any image suffix), else with its ``<filename>``.

Coordinates: the VOC devkit's ``<bndbox>`` holds 1-based, inclusive pixel indices: pixel ``i``
covers [i - 1, i] in COCO's continuous coordinates, so ``x = xmin - 1`` and
``width = xmax - xmin + 1`` (``coordinates="one_based"``, the default, as the devkit and
detectron2 read them). Tools that write 0-based box edges (often as floats) need
``coordinates="zero_based"``: ``x = xmin``, ``width = xmax - xmin``. ``difficult`` objects are
kept as ordinary objects (``iscrowd`` 0, counted; ``difficult="skip"`` leaves them out).
Without ``classes=``, the categories are the class names found, sorted (VOC's own 20 classes
are in that order); with it, an object of another class is an error naming the file, or with
``unknown_classes="skip"`` a counted skip. ``<size>`` is only compared with the image's header
(the header's size is used; a missing ``<size>`` is fine).

The XML files are read with the standard library's ``xml.etree.ElementTree`` (``defusedxml``
is not installed; the annotation files are the user's own, Python's expat >= 2.4.1 refuses
entity-expansion attacks and ElementTree never fetches external entities).
"""

from __future__ import annotations

import contextlib
import logging
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

from .reading import (
    SourceImage,
    checked_names,
    fit_box,
    input_folder,
    list_images,
    parse_all,
    visible,
)
from .summary import TRAIN, VAL, ConversionSummary
from .writing import check_output, check_val_fraction, write_dataset

__all__ = ["convert_voc"]

log = logging.getLogger(__name__)


def _read_xml(path: Path) -> ElementTree.Element:
    try:
        return ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        raise ValueError(f"{path} is not valid XML ({err}); fix or delete the file") from None


def _stem_key(path: Path, folder: Path) -> str:
    return path.relative_to(folder).with_suffix("").as_posix()


def _voc_sources(
    source: Path, train_set: str, val_set: str, summary: ConversionSummary
) -> tuple[dict[str, list[SourceImage]], Path]:
    """The images and XML files of each split, and the image folder."""
    if (source / "Annotations").is_dir():
        xml_root, image_root = source / "Annotations", source / "JPEGImages"
        if not image_root.is_dir():
            raise FileNotFoundError(
                f"{source} has Annotations/ but no JPEGImages/; the VOC layout keeps the images "
                "in JPEGImages/ (or put each image beside its XML file)"
            )
        sets = source / "ImageSets" / "Main"
        set_files = {TRAIN: sets / f"{train_set}.txt", VAL: sets / f"{val_set}.txt"}
        set_files = {split: path for split, path in set_files.items() if path.is_file()}
    else:
        xml_root = image_root = source
        set_files = {}
    images: dict[str, Path] = {}
    for image in list_images(image_root):
        key = _stem_key(image, image_root)
        if key in images:
            raise ValueError(
                f"images {images[key]} and {image} share the name {key}; rename one of them "
                "(labels are found by the image's name)"
            )
        images[key] = image
    xmls = {
        _stem_key(p, xml_root): p for p in sorted(xml_root.rglob("*.xml")) if visible(p, xml_root)
    }
    if not xmls and not images:
        raise FileNotFoundError(
            f"no VOC dataset in {source}: no .xml files nor images; point input= at the folder "
            "that holds Annotations/ and JPEGImages/ (e.g. VOCdevkit/VOC2012), or at a folder "
            "of images with their XML files"
        )
    if len(set_files) == 1:
        (only,) = set_files.values()
        set_files = {TRAIN: only}
        log.info("only %s exists: it is the one split of the source", only)
    if set_files:
        keys = {
            split: [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            for split, path in set_files.items()
        }
    else:
        keys = {TRAIN: sorted(set(images) | set(xmls))}
    sources: dict[str, list[SourceImage]] = {}
    claimed: set[Path] = set()
    for split, split_keys in keys.items():
        found: dict[str, SourceImage] = {}
        for key in split_keys:
            xml = xmls.get(key)
            image = images.get(key)
            if image is None and xml is not None:
                named = (_read_xml(xml).findtext("filename") or "").strip()
                candidate = image_root / Path(key).parent / Path(named).name
                image = candidate if named and candidate.is_file() else None
            if image is None:
                listed = f" (listed in {set_files[split]})" if set_files else ""
                summary.skip("missing_image", f"{xml or key}{listed}")
                continue
            if xml is not None:
                claimed.add(image)
            found[key] = SourceImage(image, image.relative_to(image_root).as_posix(), xml)
        # an image that an XML of another name claimed (through <filename>) is not listed twice
        sources[split] = sorted(
            (s for s in found.values() if s.label is not None or s.image not in claimed),
            key=lambda s: s.file_name,
        )
    return sources, image_root


def _voc_objects(
    path: Path,
    width: int,
    height: int,
    *,
    classes: list[str] | None,
    seen_names: set[str],
    difficult: str,
    coordinates: str,
    unknown_classes: str,
    summary: ConversionSummary,
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(class name, [x, y, w, h] in pixels) of each object of the XML file ``path``."""
    root = _read_xml(path)
    size = [root.findtext(f"size/{key}") for key in ("width", "height")]
    with contextlib.suppress(TypeError, ValueError):
        written = tuple(int(float(v)) for v in size)  # type: ignore[arg-type]
        if written != (0, 0) and written != (width, height):
            summary.note(
                "size_mismatch",
                f"{path}: <size> {written[0]}x{written[1]}, the image {width}x{height}",
            )
    objects = []
    for index, element in enumerate(root.findall("object"), 1):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{path}: <object> {index} has no <name>; name its class or delete it")
        where = f"{path}: object {index} ({name})"
        try:
            xmin, ymin, xmax, ymax = (
                float(element.findtext(f"bndbox/{k}"))  # type: ignore[arg-type]
                for k in ("xmin", "ymin", "xmax", "ymax")
            )
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: <bndbox> needs the numbers <xmin>, <ymin>, <xmax>, <ymax>; fix the "
                "object or delete it"
            ) from None
        seen_names.add(name)
        if classes is not None and name not in classes:
            if unknown_classes == "error":
                raise ValueError(
                    f"{where}: the class {name!r} is not among classes= ({', '.join(classes)}); "
                    "add it, or pass unknown_classes=skip to leave such objects out"
                )
            summary.skip("unknown_class", where)
            continue
        if (element.findtext("difficult") or "0").strip() not in ("0", ""):
            if difficult == "skip":
                summary.skip("difficult", where)
                continue
            summary.note("difficult_kept", where)
        shift = 1.0 if coordinates == "one_based" else 0.0
        box = fit_box(xmin - shift, ymin - shift, xmax, ymax, width, height, where, summary)
        if box is not None:
            objects.append((name, box))
    return objects


def convert_voc(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    difficult: str = "keep",
    coordinates: str = "one_based",
    unknown_classes: str = "error",
    train_set: str = "train",
    val_set: str = "val",
    val_fraction: float | None = None,
    seed: int = 0,
    copy_images: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionSummary:
    """Write the Pascal VOC dataset at ``input_path`` as a COCO dataset in ``output``; return
    what was written and left out.

    ``difficult``: keep or skip; ``coordinates``: one_based (the devkit's pixel indices) or
    zero_based (box edges); ``unknown_classes``: error or skip (with ``classes``);
    ``train_set`` / ``val_set``: the ``ImageSets/Main/<name>.txt`` files of the splits. The
    layouts and coordinates: the module docstring; what is written: :mod:`.writing`; errors
    and skips: :mod:`.summary`."""
    for key, value, choices in (
        ("difficult", difficult, ("keep", "skip")),
        ("coordinates", coordinates, ("one_based", "zero_based")),
        ("unknown_classes", unknown_classes, ("error", "skip")),
    ):
        if value not in choices:
            raise ValueError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    source = input_folder(input_path)
    output = check_output(output, [source], overwrite)
    names = None if classes is None else checked_names(classes, "classes=")
    summary = ConversionSummary("voc", source, output, copy_images)
    sources, _ = _voc_sources(source, train_set, val_set, summary)
    check_val_fraction(val_fraction, sources)
    seen_names: set[str] = set()

    def parse(item: SourceImage, width: int, height: int) -> list:
        if item.label is None:
            return []
        return _voc_objects(
            item.label,
            width,
            height,
            classes=names,
            seen_names=seen_names,
            difficult=difficult,
            coordinates=coordinates,
            unknown_classes=unknown_classes,
            summary=summary,
        )

    parsed = parse_all(sources, parse, summary, progress)
    summary.categories = names or sorted(seen_names)
    if not summary.categories:
        raise ValueError(
            f"no objects in the XML files of {source}, so no classes; pass classes=[...] to "
            "convert a dataset of images without objects"
        )
    index = {name: i for i, name in enumerate(summary.categories)}
    for split_items in parsed.values():
        for item in split_items:
            item.objects = [(index[name], box) for name, box in item.objects]
    write_dataset(summary, parsed, val_fraction, seed, overwrite, progress)
    return summary
