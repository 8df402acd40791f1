"""What the YOLO and VOC readers share: the source images and their label files, class-name
lists, image headers, boxes fitted to their image, and the pass that reads every image.

- Image sizes come from each file's header (PIL, without decoding the pixels); a file PIL
  cannot open is left out with its labels. A truncated file still opens: the dataset check
  (``detr-validate``, run by ``detr-convert`` at the end) decodes every image.
- A box beyond its image by at most ``BOX_TOLERANCE`` (1 px, the dataset check's tolerance)
  is clipped to it; one further out, or with a width or height <= 0, is a counted skip.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ...data.annotations import BOX_TOLERANCE
from .summary import TRAIN, VAL, ConversionSummary

__all__ = [
    "IMAGE_SUFFIXES",
    "ParsedImage",
    "SourceImage",
    "checked_names",
    "fit_box",
    "input_folder",
    "list_images",
    "parse_all",
    "progress_bar",
    "read_class_names",
    "visible",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
EXIF_ORIENTATION = 0x0112

Box = tuple[float, float, float, float]  # COCO [x, y, w, h] in pixels


@dataclass
class SourceImage:
    """An image of the source dataset and its label file (None: it has none)."""

    image: Path
    file_name: str  # posix path under the output's split folder
    label: Path | None


@dataclass
class ParsedImage:
    """An image whose header and labels were read: its objects as (class index, [x, y, w, h]
    in pixels)."""

    source: SourceImage
    image_id: int
    width: int
    height: int
    objects: list[tuple[int, Box]]


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one a line (blank lines ignored), in class-id order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"class list {path} does not exist; give a text file with one class name a line"
        )
    return checked_names(
        [
            line.strip()
            for line in path.read_text(encoding="utf-8-sig").splitlines()
            if line.strip()
        ],
        str(path),
    )


def checked_names(names: Sequence[Any], origin: str) -> list[str]:
    """``names`` as stripped strings; a ValueError naming ``origin`` when there are none, or
    one is empty or repeated."""
    names = [str(name).strip() for name in names]
    if not names:
        raise ValueError(f"{origin} names no classes; list the class names in class-id order")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated or "" in names:
        problem = f"repeats {repeated}" if repeated else "has an empty name"
        raise ValueError(
            f"the class names of {origin} {problem}; every class needs its own, non-empty name"
        )
    return names


def input_folder(input_path: str | os.PathLike) -> Path:
    """The absolute source folder (the folder of ``input_path`` when it is a file)."""
    path = Path(input_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input={path} does not exist; point input= at the dataset folder")
    return (path.parent if path.is_file() else path).absolute()


def visible(path: Path, folder: Path) -> bool:
    """Not hidden below ``folder`` (macOS ``._*`` files, ``.git`` ...)."""
    return not any(part.startswith(".") for part in path.relative_to(folder).parts)


def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, hidden ones left out), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and visible(p, folder) and p.is_file()
    )


def _image_size(path: Path, summary: ConversionSummary) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding the pixels; None (a counted
    skip) when PIL cannot open it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            except (OSError, SyntaxError, ValueError):  # a broken EXIF block: no rotation
                orientation = 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        summary.skip("unreadable_image", f"{path}: {err}")
        return None
    if orientation not in (1, None):
        summary.note("exif_rotated", f"{path} (orientation {orientation})")
    return int(width), int(height)


def fit_box(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    width: int,
    height: int,
    where: str,
    summary: ConversionSummary,
) -> Box | None:
    """COCO [x, y, w, h] of the pixel box (x0, y0, x1, y1) clipped to the image, or None (a
    counted skip) when it is empty or beyond the image by more than BOX_TOLERANCE pixels."""
    if x1 <= x0 or y1 <= y0:
        summary.skip("empty_box", f"{where}: {x1 - x0:g} x {y1 - y0:g} px")
        return None
    overshoot = max(-x0, -y0, x1 - width, y1 - height)
    described = f"{where}: [{x0:g}, {y0:g}, {x1:g}, {y1:g}] in a {width}x{height} image"
    if overshoot > BOX_TOLERANCE:
        summary.skip("outside_image", described)
        return None
    if overshoot > 0:
        summary.note("clipped", described)
        x0, x1 = max(x0, 0.0), min(x1, float(width))
        y0, y1 = max(y0, 0.0), min(y1, float(height))
        if x1 <= x0 or y1 <= y0:
            summary.skip("empty_box", f"{where}: empty once clipped to the image")
            return None
    return (round(x0, 6), round(y0, 6), round(x1 - x0, 6), round(y1 - y0, 6))


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[], Any]]:
    """A function that advances a progress bar on stderr by one (a no-op when not enabled)."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task, 1)


def parse_all(
    sources: dict[str, list[SourceImage]],
    parse: Callable[[SourceImage, int, int], list],
    summary: ConversionSummary,
    progress: bool,
) -> dict[str, list[ParsedImage]]:
    """Read every image header and label file (``parse(item, width, height)``: its objects);
    image ids 1..N, train first."""
    parsed: dict[str, list[ParsedImage]] = {}
    next_id = 1
    total = sum(map(len, sources.values()))
    with progress_bar(progress, total, "reading labels") as advance:
        for split in (TRAIN, VAL):
            for item in sources.get(split, []):
                advance()
                size = _image_size(item.image, summary)
                if size is None:
                    continue
                if item.label is None:
                    summary.note("no_label_file", str(item.image))
                objects = parse(item, *size)
                parsed.setdefault(split, []).append(ParsedImage(item, next_id, *size, objects))
                next_id += 1
    if not parsed.get(TRAIN):
        raise ValueError(
            f"no readable images in {summary.source} (unreadable: "
            f"{summary.skipped['unreadable_image']}); nothing to convert"
        )
    return parsed
