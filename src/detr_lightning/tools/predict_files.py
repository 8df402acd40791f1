"""Detections for image files, folders and glob patterns: ``detections.json`` and drawings in
an output folder (what ``detr-predict`` writes)."""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..data.images import IMAGE_SUFFIXES, inference_size
from ..inference import graphs
from ..inference.predictor import Predictor, decoded_images
from ..inference.slicing import SliceSettings, predict_sliced
from ..utils.errors import SetupError
from ..utils.io import write_json_atomic
from ..viz.drawing import draw_detections

log = logging.getLogger(__name__)

__all__ = ["image_files", "predict_files", "shared_input_shapes"]


# ---------------------------------------------------------------------------------- files
def image_files(inputs: str | os.PathLike) -> list[Path]:
    """The image files that ``inputs`` names: one file, a folder's images or a glob's.

    A folder gives its files with an image suffix (:data:`IMAGE_SUFFIXES`), sorted, not
    recursive; a pattern (``*``, ``?``, ``[``; ``**`` recurses) its matches with an image
    suffix, sorted. Raises SetupError when nothing matches.
    """
    text = os.path.expanduser(str(inputs))
    path = Path(text)
    if path.is_file():
        return [path]

    def is_image(candidate: Path) -> bool:
        return candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES

    suffixes = ", ".join(IMAGE_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if is_image(p))
        if not files:
            raise SetupError(f"input folder {path} holds no image files ({suffixes})")
        return files
    if glob.has_magic(text):
        files = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if is_image(p))
        if not files:
            raise SetupError(f"input pattern {inputs} matches no image files ({suffixes})")
        return files
    raise SetupError(
        f"input {inputs} does not exist; pass an image file, a folder of images or a glob "
        "pattern in quotes (input='photos/*.jpg')"
    )


def _drawing_names(files: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per file, numbered ``<stem>-2.png``... where stems repeat."""
    used: set[str] = set()
    names = []
    for file in files:
        name, count = f"{file.stem}.png", 1
        while name in used:  # a.jpg and a.png, or the same name in two folders of a glob
            count += 1
            name = f"{file.stem}-{count}.png"
        used.add(name)
        names.append(name)
    return names


def predict_files(
    predictor: Predictor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    threshold: float = 0.7,
    top_k: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bf16: bool = False,
    draw: bool = True,
    static_shapes: int | None = None,
    slicing: SliceSettings | None = None,
) -> Path:
    """Detect objects in image files; write ``detections.json`` (and drawings) into ``out_dir``.

    ``inputs`` is an image file, a folder or a glob pattern (see :func:`image_files`), or a list
    of files. Files that do not decode are skipped with a warning naming them. The JSON is one
    list with an entry per processed image, in input order: ``file_name``, ``height``,
    ``width`` (original pixels), ``drawing`` (with ``draw``) and ``detections``, each with
    ``file_name``, ``category_id``, ``name``, ``score`` and ``bbox`` as absolute
    ``[x, y, width, height]``. With ``draw``, ``drawn/<stem>.png`` shows the detections.
    Returns the path of ``detections.json``.

    ``static_shapes`` N: every model input shape that at least N of the files share (read
    from their headers before any is decoded) is declared static for the run
    (:func:`~detr_lightning.inference.graphs.set_static_shapes`): on the CPU in float32 its
    images go through a graph compiled for that shape (the whole model 4-10% faster on a
    2-core AVX2 CPU, about 20% on a 16-core AMX one), for a compilation of a few seconds at
    the shape's first image (ResNet-101 at 800 pixels: about 6 s on 2 cores), so worth it
    from some tens of images of one size, e.g. a camera's frames. Chosen from the whole input
    before the first image, the shapes do not depend on the order of the files. None: the
    general graph for every size.

    ``slicing``: each image is detected in overlapping tiles (and as a whole), merged
    (:func:`~detr_lightning.inference.slicing.predict_sliced`), one image after the other
    with ``batch_size`` tiles per forward pass; None: every image as a whole.
    """
    from rich.progress import Progress
    from torchvision.io import write_png

    if isinstance(inputs, (str, os.PathLike)):
        files = image_files(inputs)
    else:
        files = [Path(file) for file in inputs]
    out_dir = Path(out_dir)
    drawn_dir = out_dir / "drawn"
    if draw:
        drawn_dir.mkdir(parents=True, exist_ok=True)
    drawing_names = _drawing_names(files)
    records: dict[int, dict[str, Any]] = {}
    backbone, declared = predictor.model.backbone, None
    if static_shapes is not None:
        shapes = shared_input_shapes(files, predictor.preprocessing, batch_size, static_shapes)
        if not shapes <= graphs.static_shapes(backbone):
            declared = graphs.static_shapes(backbone)  # put back (graphs dropped) at the end
            graphs.set_static_shapes(backbone, declared | shapes)
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("predicting", total=len(files))
            options: dict[str, Any] = {
                "threshold": threshold,
                "top_k": top_k,
                "batch_size": batch_size,
                "device": device,
                "bf16": bf16,
            }
            # Files are read lazily: only the images of unfinished batches are in memory.
            if slicing is None:
                predictions = (
                    (image.index, image.size, image.pixels, detection)
                    for image, detection in predictor.iter_predictions(
                        files, keep_pixels=draw, skip_unreadable=True, **options
                    )
                )
            else:
                predictions = _sliced(predictor, files, slicing, **options)
            for index, size, pixels, detection in predictions:
                record = _record(files[index], size, detection)
                if draw:
                    assert pixels is not None  # keep_pixels=draw
                    name = drawing_names[index]
                    write_png(draw_detections(pixels, detection), str(drawn_dir / name))
                    record["drawing"] = str(Path("drawn") / name)
                records[index] = record
                progress.advance(task)
            # unreadable files never come back: complete the bar for them
            progress.update(task, completed=len(files))
    finally:
        if declared is not None:
            graphs.set_static_shapes(backbone, declared)
    return write_json_atomic(out_dir / "detections.json", [records[i] for i in sorted(records)])


def _sliced(
    predictor: Predictor, files: Sequence[Path], slicing: SliceSettings, **options: Any
) -> Iterator[tuple[int, tuple[int, int], Tensor, dict[str, Any]]]:
    """``(index, (height, width), pixels, detection)`` of each readable file, in order,
    detected in tiles; a file that does not decode is named in a warning and left out."""
    for index, pixels in decoded_images(files, skip_unreadable=True):
        (detection,) = predict_sliced(predictor, pixels, slicing, **options)
        yield index, (int(pixels.shape[-2]), int(pixels.shape[-1])), pixels, detection


def shared_input_shapes(
    files: Sequence[Path], data: Any, batch_size: int, min_images: int
) -> set[tuple[int, int, int, int]]:
    """The model input shapes [batch_size, 3, H', W'] of the preprocessed sizes that at least
    ``min_images`` of ``files`` share, from the files' headers (size and EXIF orientation);
    logs what it found. A file whose header does not read counts for no size (its decoding
    reports it later)."""
    if min_images < 1:
        raise ValueError(f"static_shapes must be a number of images >= 1, got {min_images}")
    # the preprocessing runs once per distinct file size (a camera's frames share one)
    file_sizes = Counter(size for size in map(_oriented_size, files) if size is not None)
    sizes: Counter[tuple[int, int]] = Counter()
    for size, count in file_sizes.items():
        sizes[inference_size(data, *size)] += count
    shared = {size: count for size, count in sizes.items() if count >= min_images}
    if shared:
        log.info(
            "static shapes: a graph compiled for each of %d input size(s) shared by at least "
            "%d images (%s); %d of %d images",
            len(shared), min_images,
            ", ".join(f"{h}x{w}" for h, w in sorted(shared)),
            sum(shared.values()), len(files),
        )  # fmt: skip
    else:
        log.info("static shapes: no input size is shared by %d images; none declared", min_images)
    return {(batch_size, 3, height, width) for height, width in shared}


def _oriented_size(file: Path) -> tuple[int, int] | None:
    """(height, width) of an image file as decoded (EXIF orientation applied), from its header."""
    try:
        with Image.open(file) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # transposed or rotated by 90
                height, width = width, height
            return height, width
    except Exception:  # PIL raises many kinds; the scan only steers speed, never results
        return None


def _record(file: Path, size: tuple[int, int], detection: dict[str, Any]) -> dict[str, Any]:
    boxes = detection["boxes"].tolist()
    return {
        "file_name": str(file),
        "height": size[0],
        "width": size[1],
        "detections": [
            {
                "file_name": str(file),
                "category_id": int(category_id),
                "name": name,
                "score": round(float(score), 5),
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
            }
            for category_id, name, score, (x0, y0, x1, y1) in zip(
                detection["category_ids"].tolist(),
                detection["names"],
                detection["scores"].tolist(),
                boxes,
            )
        ],
    }
