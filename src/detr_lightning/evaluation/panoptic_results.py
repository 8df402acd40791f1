"""Panoptic predictions in the COCO panoptic results format: one PNG per image (segment id
``R + 256 G + 256^2 B``) and one JSON with each image's ``segments_info``, what
panopticapi's ``pq_compute`` and :func:`~.panoptic_quality.pq_from_files` read."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.panoptic import id_to_rgb, segment_extent
from ..models.panoptic_postprocess import PanopticSegmentation
from ..utils.io import write_json_atomic


def panoptic_annotation(
    image_id: int,
    file_name: str,
    result: PanopticSegmentation,
    category_id: Callable[[int], int] | Mapping[int, int] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """(the JSON entry of one image, its segment id map [H, W] for the PNG).

    Segment ids are renumbered from 1 in segment order, so that 0 stays VOID (the pixels of
    an image without segments); ``category_id`` maps the model's class index to the
    dataset's category id (default: the same number, as for COCO panoptic's 250 classes).
    Each segment gets its ``bbox`` (absolute xywh, of its pixels) and ``area``.
    """
    to_category = (
        (lambda index: index)
        if category_id is None
        else (category_id.__getitem__ if isinstance(category_id, Mapping) else category_id)
    )
    source = result.segment_map.cpu().numpy()
    ids = np.zeros(source.shape, dtype=np.int64)
    segments = []
    for number, segment in enumerate(result.segments_info, start=1):
        pixels = source == segment["id"]
        ids[pixels] = number
        area, bbox = segment_extent(pixels)
        segments.append({
            "id": number,
            "category_id": int(to_category(int(segment["category_id"]))),
            "isthing": int(bool(segment["isthing"])),
            "area": area,
            "bbox": bbox,
        })  # fmt: skip
    return {"image_id": int(image_id), "file_name": file_name, "segments_info": segments}, ids


def write_panoptic_results(
    results: Iterable[tuple[int, str, PanopticSegmentation]],
    json_path: str | os.PathLike,
    png_folder: str | os.PathLike | None = None,
    category_id: Callable[[int], int] | Mapping[int, int] | None = None,
) -> Path:
    """Write ``(image_id, image file name, result)`` triples as a COCO panoptic results set:
    ``<png_folder>/<image stem>.png`` (default folder: ``json_path`` without ``.json``) and
    ``json_path`` (``{"annotations": [...]}``, written atomically after every PNG). Returns
    the PNG folder."""
    json_path = Path(json_path)
    folder = Path(png_folder) if png_folder is not None else json_path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for image_id, image_file, result in results:
        file_name = Path(image_file).stem + ".png"
        annotation, ids = panoptic_annotation(image_id, file_name, result, category_id)
        Image.fromarray(id_to_rgb(ids)).save(folder / file_name)
        annotations.append(annotation)
    write_json_atomic(json_path, {"annotations": annotations})
    return folder


def read_panoptic_results(json_path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The annotations of a results JSON by image id."""
    data = json.loads(Path(json_path).read_text())
    return {int(a["image_id"]): a for a in data["annotations"]}
