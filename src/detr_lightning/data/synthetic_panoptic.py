"""A small synthetic panoptic dataset written as a real COCO panoptic directory.

Each image is split into horizontal bands of "stuff" (sky on top, then wall, then ground; two
or three bands), each a flat colour with noise, and shows a few "things": the shapes of
:mod:`~detr_lightning.data.synthetic` (a category is a colour and a shape), drawn over the
bands and over each other. Every pixel belongs to one segment; segments are exact (the id map
is drawn with the same primitives as the picture, without antialiasing). Optionally
``crowd_fraction`` of the things are marked ``iscrowd`` and a ``void_border`` of unlabeled
(VOID, id 0) pixels frames the image, so that the PQ evaluation meets both.

Layout (that of COCO panoptic 2017)::

    root/train2017/000000000001.jpg ...            root/val2017/...
    root/annotations/panoptic_train2017.json      root/annotations/panoptic_val2017.json
    root/annotations/panoptic_train2017/000000000001.png ...

PNG segment ids are ``R + 256 G + 256^2 B``. Thing categories keep the detection set's ids
(1, 2, 5, 6, ...), stuff categories are 101 (sky), 102 (wall), 103 (ground). The same
parameters give byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .panoptic import id_to_rgb, segment_extent
from .synthetic import (
    _background,
    _category_style,
    _overlap_ok,
    _shape_polygon,
    cached_dataset,
    synthetic_categories,
)

__all__ = [
    "PANOPTIC_DEFAULTS",
    "STUFF_CATEGORIES",
    "ensure_synthetic_panoptic",
    "generate_synthetic_panoptic",
]

FORMAT_VERSION = 1

STUFF_CATEGORIES = (
    {"id": 101, "name": "sky", "isthing": 0, "colour": (120, 170, 230)},
    {"id": 102, "name": "wall", "isthing": 0, "colour": (150, 150, 140)},
    {"id": 103, "name": "ground", "isthing": 0, "colour": (120, 90, 50)},
)

PANOPTIC_DEFAULTS: dict[str, Any] = {
    "num_train": 512,
    "num_val": 64,
    "num_categories": 3,  # thing categories
    "min_size": 80,
    "max_size": 112,
    "min_objects": 1,
    "max_objects": 3,
    "min_object_fraction": 0.25,
    "max_object_fraction": 0.5,
    "max_overlap": 0.2,
    "crowd_fraction": 0.0,
    "void_border": 0,
    "seed": 0,
}


def panoptic_categories(num_categories: int) -> list[dict[str, Any]]:
    """COCO panoptic ``categories``: the things (``isthing`` 1) then the stuff (0)."""
    things = [{**c, "isthing": 1} for c in synthetic_categories(num_categories)]
    stuff = [{k: v for k, v in c.items() if k != "colour"} for c in STUFF_CATEGORIES]
    return things + stuff


def _draw_panoptic(
    rng: np.random.Generator, params: dict[str, Any], things: list[dict[str, Any]]
) -> tuple[Image.Image, np.ndarray, list[dict[str, Any]]]:
    """One image, its segment id map [H, W] and segments (id, category, iscrowd)."""
    width = int(rng.integers(params["min_size"], params["max_size"] + 1))
    height = int(rng.integers(params["min_size"], params["max_size"] + 1))
    picture = np.zeros((height, width, 3), np.uint8)
    ids = Image.new("I", (width, height), 0)
    id_draw = ImageDraw.Draw(ids)
    segments: list[dict[str, Any]] = []
    # stuff bands: sky and ground always, a wall between them in half of the images
    bands = [STUFF_CATEGORIES[0], STUFF_CATEGORIES[2]]
    if rng.random() < 0.5:
        bands.insert(1, STUFF_CATEGORIES[1])
    cuts = np.sort(rng.integers(height // 5, height - height // 5, size=len(bands) - 1))
    edges = [0, *cuts.tolist(), height]
    for band, top, bottom in zip(bands, edges[:-1], edges[1:]):
        if bottom <= top:
            continue
        segment_id = len(segments) + 1
        colour = np.clip(np.array(band["colour"]) + rng.integers(-15, 16, size=3), 0, 255)
        noise = _background(rng, bottom - top, width, noisy=True).astype(np.int16) - 128
        picture[top:bottom] = np.clip(colour + noise // 3, 0, 255).astype(np.uint8)
        id_draw.rectangle((0, top, width - 1, bottom - 1), fill=segment_id)
        segments.append({"id": segment_id, "category_id": band["id"], "iscrowd": 0})
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    low = max(4, round(params["min_object_fraction"] * short))
    high = max(low, round(params["max_object_fraction"] * short))
    placed: list[tuple[int, int, int, int]] = []
    count = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
    for _ in range(count):
        for _attempt in range(20):
            w = int(rng.integers(low, high + 1))
            h = int(rng.integers(max(low, w // 2), min(high, 2 * w) + 1))
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            if _overlap_ok((x, y, w, h), placed, params["max_overlap"]):
                break
        else:
            continue
        placed.append((x, y, w, h))
        index = int(rng.integers(len(things)))
        shape, colour = _category_style(index)
        fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.integers(-12, 13, 3), 0, 255))
        segment_id = len(segments) + 1
        for canvas, value in ((draw, fill), (id_draw, segment_id)):
            if shape == "rectangle":
                canvas.rectangle((x, y, x + w - 1, y + h - 1), fill=value)
            elif shape == "ellipse":
                canvas.ellipse((x, y, x + w - 1, y + h - 1), fill=value)
            else:
                canvas.polygon(_shape_polygon(shape, x, y, w, h), fill=value)
        crowd = int(rng.random() < params["crowd_fraction"])
        segments.append({"id": segment_id, "category_id": things[index]["id"], "iscrowd": crowd})
    id_map = np.asarray(ids, dtype=np.int64).copy()
    border = int(params["void_border"])
    if border:
        for region in (np.s_[:border], np.s_[-border:]):
            id_map[region] = 0
            id_map[:, region] = 0
        image.paste((0, 0, 0), (0, 0, width, border))
        image.paste((0, 0, 0), (0, height - border, width, height))
        image.paste((0, 0, 0), (0, 0, border, height))
        image.paste((0, 0, 0), (width - border, 0, width, height))
    return image, id_map, segments


def _segment_entries(id_map: np.ndarray, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``segments_info``: the segments with pixels left, with area and bbox (xywh)."""
    entries = []
    for segment in segments:
        area, bbox = segment_extent(id_map == segment["id"])
        if area:  # else covered by later things or by the VOID border
            entries.append({**segment, "area": area, "bbox": bbox})
    return entries


def _write_split(root: Path, split: str, count: int, first_id: int, params: dict, index: int):
    rng = np.random.default_rng([params["seed"], index, 7])
    categories = panoptic_categories(params["num_categories"])
    things = [c for c in categories if c["isthing"]]
    image_dir = root / f"{split}2017"
    png_dir = root / "annotations" / f"panoptic_{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for offset in range(count):
        image_id = first_id + offset
        image, id_map, segments = _draw_panoptic(rng, params, things)
        name = f"{image_id:012d}"
        image.save(image_dir / f"{name}.jpg", format="JPEG", quality=92)
        Image.fromarray(id_to_rgb(id_map)).save(png_dir / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": image.width,
                       "height": image.height})  # fmt: skip
        annotations.append({"image_id": image_id, "file_name": f"{name}.png",
                            "segments_info": _segment_entries(id_map, segments)})  # fmt: skip
    dataset = {
        "info": {"description": "detr_lightning synthetic panoptic", "params": params},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = root / "annotations" / f"panoptic_{split}2017.json"
    path.write_text(json.dumps(dataset, separators=(",", ":")))


def _resolve(**params: Any) -> dict[str, Any]:
    unknown = sorted(set(params) - set(PANOPTIC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown synthetic panoptic parameters {unknown}; valid ones: "
                         f"{sorted(PANOPTIC_DEFAULTS)}")  # fmt: skip
    resolved = {**PANOPTIC_DEFAULTS, **params}
    for key, default in PANOPTIC_DEFAULTS.items():
        resolved[key] = type(default)(resolved[key])
    if not 16 <= resolved["min_size"] <= resolved["max_size"]:
        raise ValueError("need 16 <= min_size <= max_size")
    if not 0 <= resolved["min_objects"] <= resolved["max_objects"]:
        raise ValueError("need 0 <= min_objects <= max_objects")
    if not 0.0 <= resolved["crowd_fraction"] <= 1.0:
        raise ValueError(f"crowd_fraction must be in [0, 1], got {resolved['crowd_fraction']}")
    if not 0 <= resolved["void_border"] < resolved["min_size"] // 4:
        raise ValueError(f"void_border must be in [0, min_size / 4), got {resolved['void_border']}")
    synthetic_categories(resolved["num_categories"])  # validates the count
    return resolved


def generate_synthetic_panoptic(root: str | os.PathLike, **params: Any) -> Path:
    """Write the synthetic panoptic dataset under ``root``; ``params``: keys of
    :data:`PANOPTIC_DEFAULTS` (sizes in pixels, object sides as fractions of the short
    side)."""
    resolved = _resolve(**params)
    root = Path(root)
    _write_split(root, "train", resolved["num_train"], 1, resolved, 0)
    _write_split(root, "val", resolved["num_val"], resolved["num_train"] + 1, resolved, 1)
    return root


def ensure_synthetic_panoptic(cache_dir: str | os.PathLike | None = None, **params: Any) -> Path:
    """The synthetic panoptic dataset for ``params`` in the cache, generated on first use
    (atomically, as :func:`~detr_lightning.data.synthetic.ensure_synthetic_coco`)."""
    resolved = _resolve(**params)
    return cached_dataset(
        "synthetic-panoptic", FORMAT_VERSION, resolved, generate_synthetic_panoptic, cache_dir
    )
