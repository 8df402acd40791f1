"""Helpers for the data tests: tiny hand-written COCO directories and small synthetic sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detr_lightning.data.synthetic import generate_synthetic_coco

TINY_SYNTHETIC = {
    "num_train": 12,
    "num_val": 6,
    "num_categories": 5,
    "min_size": 64,
    "max_size": 128,
    "min_objects": 1,
    "max_objects": 4,
    "empty_fraction": 0.2,
    "seed": 3,
}


def make_tiny_synthetic(root: Path, **overrides: Any) -> Path:
    """A small synthetic COCO directory (64..128 px images) under ``root``."""
    return generate_synthetic_coco(root, **{**TINY_SYNTHETIC, **overrides})


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    """Write a random image of the given size and PIL mode (format from the suffix)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)


def write_coco(
    root: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    *,
    split: str = "val",
    write_files: bool = True,
) -> tuple[Path, Path]:
    """Write ``root/<split>2017/*`` images and ``root/annotations/instances_<split>2017.json``.

    Image entries need ``id``, ``width``, ``height``; ``file_name`` defaults to ``<id>.jpg``.
    Returns (image_dir, annotation_file).
    """
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    for entry in images:
        entry.setdefault("file_name", f"{entry['id']}.jpg")
        if write_files:
            write_image(image_dir / entry["file_name"], entry["width"], entry["height"])
    for index, ann in enumerate(annotations):
        ann.setdefault("id", index + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    annotation_file = root / "annotations" / f"instances_{split}2017.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "annotations": annotations, "categories": categories}
    annotation_file.write_text(json.dumps(payload))
    return image_dir, annotation_file


def tiny_coco(root: Path, *, split: str = "val") -> tuple[Path, Path]:
    """Two images (100x50 with a box and a crowd box; 40x80 empty), category ids 3 and 7."""
    images = [{"id": 1, "width": 100, "height": 50}, {"id": 2, "width": 40, "height": 80}]
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [10.0, 5.0, 20.0, 10.0]},
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [50.0, 0.0, 50.0, 50.0], "iscrowd": 1},
    ]
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    return write_coco(root, images, annotations, categories, split=split)


def noise(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 pixels [3, height, width]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def save_png(pixels: torch.Tensor, path: Path) -> Path:
    """Write uint8 pixels [3, H, W] as a PNG file; returns ``path``."""
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    return path


CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def write_clean(root: Path) -> None:
    """Both splits: 3 train images (one empty), 2 val images, boxes well inside."""
    train_images = [
        {"id": 1, "width": 100, "height": 50},
        {"id": 2, "width": 64, "height": 64},
        {"id": 3, "width": 40, "height": 40},
    ]
    train_annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 10.0]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50.0, 0.0, 50.0, 50.0]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0.0, 0.0, 64.0, 64.0]},
    ]
    write_coco(root, train_images, train_annotations, CATEGORIES, split="train")
    val_images = [{"id": 10, "width": 80, "height": 60}, {"id": 11, "width": 30, "height": 30}]
    val_annotations = [
        {"id": 10, "image_id": 10, "category_id": 1, "bbox": [1.0, 1.0, 30.0, 30.0]},
        {"id": 11, "image_id": 11, "category_id": 2, "bbox": [0.0, 0.0, 30.0, 30.0]},
    ]
    write_coco(root, val_images, val_annotations, CATEGORIES, split="val")


def write_broken(root: Path) -> None:
    """A clean val split and a train split with one of each problem."""
    write_clean(root)
    images = [
        {"id": 1, "width": 100, "height": 50},
        {"id": 2, "width": 64, "height": 64, "file_name": "gone.jpg"},  # deleted below
        {"id": 3, "width": 64, "height": 64, "file_name": "corrupt.jpg"},  # garbage below
        {"id": 3, "width": 64, "height": 64, "file_name": "again.jpg"},  # duplicate id
    ]
    annotations = [
        {"id": 21, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 0.0, 5.0]},  # w = 0
        {"id": 22, "image_id": 1, "category_id": 1, "bbox": [90.0, 40.0, 20.0, 20.0]},  # outside
        {"id": 23, "image_id": 1, "category_id": 99, "bbox": [1.0, 1.0, 5.0, 5.0]},  # category
        {"id": 24, "image_id": 7, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0]},  # image
        {"id": 25, "image_id": 1, "category_id": 2, "bbox": [1.0, 1.0, 5.0, 5.0]},
        {"id": 25, "image_id": 1, "category_id": 2, "bbox": [2.0, 2.0, 5.0, 5.0]},  # same id
    ]
    image_dir, _ = write_coco(root, images, annotations, CATEGORIES, split="train")
    (image_dir / "gone.jpg").unlink()
    (image_dir / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")


def write_street_image(path: Path) -> Path:
    """A 150 x 230 PNG with a few rectangles on noise; returns ``path``."""
    pixels = torch.randint(0, 60, (150, 230, 3), dtype=torch.uint8)
    pixels[20:90, 30:120] = torch.tensor([200, 40, 40], dtype=torch.uint8)
    pixels[70:140, 150:220] = torch.tensor([40, 200, 90], dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path
