"""A small synthetic detection dataset written as a real COCO directory.

Each image shows one to a few filled shapes (rectangles, ellipses, triangles, crosses) on a
plain or noisy grey background. A category is a (colour, shape) pair; the first eight categories
differ in colour, so up to eight classes can be told apart by colour alone, which a small DETR
learns on a CPU in minutes. More categories reuse colours with other shapes (harder). Category
ids are deliberately not contiguous (1, 2, 5, 6, 9, ...) so the label mapping is exercised.

Layout (the same as COCO 2017)::

    root/train2017/000000000001.jpg ...
    root/val2017/...
    root/annotations/instances_train2017.json, instances_val2017.json

Boxes are COCO ``bbox`` = [x, y, width, height] in absolute pixels; every shape lies fully
inside its image. Output is deterministic: the same parameters give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEFAULT_PARAMS",
    "default_cache_dir",
    "ensure_synthetic_coco",
    "generate_synthetic_coco",
    "synthetic_categories",
]

# Bump when the generator's output changes, so cached datasets are rebuilt.
FORMAT_VERSION = 1

SHAPES = ("rectangle", "ellipse", "triangle", "cross")
COLOURS = (
    ("red", (220, 30, 30)),
    ("green", (30, 170, 50)),
    ("blue", (30, 70, 225)),
    ("yellow", (240, 210, 20)),
    ("magenta", (210, 40, 200)),
    ("cyan", (20, 200, 215)),
    ("orange", (245, 130, 15)),
    ("purple", (110, 40, 170)),
)
MAX_CATEGORIES = len(COLOURS) * len(SHAPES)

DEFAULT_PARAMS: dict[str, Any] = {
    "num_train": 1000,
    "num_val": 100,
    "num_categories": 6,
    "min_size": 160,
    "max_size": 320,
    "min_objects": 1,
    "max_objects": 4,
    "empty_fraction": 0.05,
    "min_object_fraction": 0.2,
    "max_object_fraction": 0.5,
    "max_overlap": 0.3,
    "noise_fraction": 0.5,
    "seed": 0,
}


def synthetic_categories(num_categories: int) -> list[dict[str, Any]]:
    """COCO ``categories`` entries: ids 1, 2, 5, 6, 9, 10, ...; names like ``"red rectangle"``."""
    if not 1 <= num_categories <= MAX_CATEGORIES:
        raise ValueError(
            f"num_categories must be in [1, {MAX_CATEGORIES}], got {num_categories}; "
            f"the generator has {len(COLOURS)} colours x {len(SHAPES)} shapes"
        )
    categories = []
    for index in range(num_categories):
        # colour cycles fastest; the shape shifts each time the colours wrap around, so every
        # (colour, shape) pair is unique.
        colour_name, _ = COLOURS[index % len(COLOURS)]
        shape = SHAPES[(index + index // len(COLOURS)) % len(SHAPES)]
        categories.append(
            {
                "id": 1 + index + 2 * (index // 2),
                "name": f"{colour_name} {shape}",
                "supercategory": shape,
            }
        )
    return categories


def _category_style(index: int) -> tuple[str, tuple[int, int, int]]:
    shape = SHAPES[(index + index // len(COLOURS)) % len(SHAPES)]
    return shape, COLOURS[index % len(COLOURS)][1]


def _shape_polygon(shape: str, x: int, y: int, w: int, h: int) -> list[tuple[float, float]]:
    """Outline of ``shape`` inscribed in the pixel box [x, x + w) x [y, y + h)."""
    x1, y1 = x + w, y + h
    if shape == "rectangle":
        return [(x, y), (x1, y), (x1, y1), (x, y1)]
    if shape == "triangle":
        return [(x, y1), (x + w / 2, y), (x1, y1)]
    if shape == "ellipse":
        cx, cy = x + w / 2, y + h / 2
        angles = np.linspace(0.0, 2.0 * math.pi, 32, endpoint=False)
        return [(cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)) for a in angles.tolist()]
    # cross: a horizontal and a vertical bar, each a third of the box thick
    tx, ty = w / 3, h / 3
    return [
        (x + tx, y), (x + 2 * tx, y), (x + 2 * tx, y + ty), (x1, y + ty), (x1, y + 2 * ty),
        (x + 2 * tx, y + 2 * ty), (x + 2 * tx, y1), (x + tx, y1), (x + tx, y + 2 * ty),
        (x, y + 2 * ty), (x, y + ty), (x + tx, y + ty),
    ]  # fmt: skip


def _polygon_area(points: Sequence[tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2.0)


def _background(rng: np.random.Generator, height: int, width: int, noisy: bool) -> np.ndarray:
    """Low-saturation grey background, [H, W, 3] uint8, optionally with Gaussian noise."""
    grey = rng.uniform(70, 190)
    tint = rng.uniform(-15, 15, size=3)
    base = np.clip(grey + tint, 0, 255)
    pixels = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if noisy:
        pixels = pixels + rng.normal(0.0, 14.0, size=(height, width, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def _overlap_ok(box: tuple[int, int, int, int], placed: list, max_overlap: float) -> bool:
    """True when ``box`` covers at most ``max_overlap`` of any placed box (and vice versa)."""
    x, y, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x + w, px + pw) - max(x, px)
        ih = min(y + h, py + ph) - max(y, py)
        if iw > 0 and ih > 0 and iw * ih > max_overlap * min(w * h, pw * ph):
            return False
    return True


def _draw_image(
    rng: np.random.Generator, num_objects: int, categories: list[dict], params: dict
) -> tuple[Image.Image, list[dict[str, Any]]]:
    width = int(rng.integers(params["min_size"], params["max_size"] + 1))
    height = int(rng.integers(params["min_size"], params["max_size"] + 1))
    noisy = bool(rng.random() < params["noise_fraction"])
    image = Image.fromarray(_background(rng, height, width, noisy))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    lo = max(4, round(params["min_object_fraction"] * short))
    hi = max(lo, round(params["max_object_fraction"] * short))
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(num_objects):
        for _attempt in range(20):
            w = int(rng.integers(lo, hi + 1))
            h = int(rng.integers(max(lo, w // 2), min(hi, 2 * w) + 1))
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            if _overlap_ok((x, y, w, h), placed, params["max_overlap"]):
                break
        else:
            continue  # image too crowded for another object; keep what fits
        placed.append((x, y, w, h))
        cat_index = int(rng.integers(len(categories)))
        shape, colour = _category_style(cat_index)
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(colour) + jitter, 0, 255))
        polygon = _shape_polygon(shape, x, y, w, h)
        if shape == "rectangle":
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=fill)
        elif shape == "ellipse":
            draw.ellipse((x, y, x + w - 1, y + h - 1), fill=fill)
        else:
            draw.polygon(polygon, fill=fill)
        objects.append(
            {
                "category_id": categories[cat_index]["id"],
                "bbox": [float(x), float(y), float(w), float(h)],
                "area": round(_polygon_area(polygon), 2),
                "segmentation": [[round(v, 2) for point in polygon for v in point]],
                "iscrowd": 0,
            }
        )
    return image, objects


def _write_split(
    root: Path, split: str, num_images: int, first_id: int, params: dict, split_index: int
) -> None:
    rng = np.random.default_rng([params["seed"], split_index])
    categories = synthetic_categories(params["num_categories"])
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    num_empty = 0
    if params["empty_fraction"] > 0 and num_images > 0:
        num_empty = max(1, round(params["empty_fraction"] * num_images))
    empty = set(rng.choice(num_images, size=min(num_empty, num_images), replace=False).tolist())
    images, annotations = [], []
    for index in range(num_images):
        image_id = first_id + index
        count = (
            0
            if index in empty
            else int(rng.integers(params["min_objects"], params["max_objects"] + 1))
        )
        image, objects = _draw_image(rng, count, categories, params)
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, format="JPEG", quality=92)
        images.append(
            {"id": image_id, "file_name": file_name, "width": image.width, "height": image.height}
        )
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    dataset = {
        "info": {
            "description": "detr_lightning synthetic shapes",
            "version": str(FORMAT_VERSION),
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(dataset, f, separators=(",", ":"))


def _resolve_params(**params: Any) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(
            f"unknown synthetic dataset parameters {unknown}; valid ones: {sorted(DEFAULT_PARAMS)}"
        )
    resolved = {**DEFAULT_PARAMS, **params}
    int_keys = ("num_train", "num_val", "num_categories", "min_size", "max_size", "seed")
    for key in (*int_keys, "min_objects", "max_objects"):
        resolved[key] = int(resolved[key])
        if resolved[key] < 0:
            raise ValueError(f"synthetic parameter {key} must be >= 0, got {resolved[key]}")
    if not 16 <= resolved["min_size"] <= resolved["max_size"]:
        raise ValueError(
            f"need 16 <= min_size <= max_size, got min_size={resolved['min_size']}, "
            f"max_size={resolved['max_size']}"
        )
    if resolved["min_objects"] > resolved["max_objects"]:
        raise ValueError(
            f"min_objects={resolved['min_objects']} exceeds max_objects={resolved['max_objects']}"
        )
    for key in ("min_object_fraction", "max_object_fraction"):
        resolved[key] = float(resolved[key])
    if not 0 < resolved["min_object_fraction"] <= resolved["max_object_fraction"] <= 1:
        raise ValueError(
            "need 0 < min_object_fraction <= max_object_fraction <= 1, got "
            f"{resolved['min_object_fraction']} and {resolved['max_object_fraction']}"
        )
    for key in ("empty_fraction", "noise_fraction", "max_overlap"):
        resolved[key] = float(resolved[key])
        if not 0.0 <= resolved[key] <= 1.0:
            raise ValueError(f"synthetic parameter {key} must be in [0, 1], got {resolved[key]}")
    synthetic_categories(resolved["num_categories"])  # validates the count
    return resolved


def generate_synthetic_coco(
    root: str | os.PathLike,
    *,
    num_train: int = DEFAULT_PARAMS["num_train"],
    num_val: int = DEFAULT_PARAMS["num_val"],
    num_categories: int = DEFAULT_PARAMS["num_categories"],
    min_size: int = DEFAULT_PARAMS["min_size"],
    max_size: int = DEFAULT_PARAMS["max_size"],
    min_objects: int = DEFAULT_PARAMS["min_objects"],
    max_objects: int = DEFAULT_PARAMS["max_objects"],
    empty_fraction: float = DEFAULT_PARAMS["empty_fraction"],
    seed: int = DEFAULT_PARAMS["seed"],
    **extra: Any,
) -> Path:
    """Write the synthetic dataset under ``root`` (created if needed) and return ``root``.

    ``min_size``/``max_size`` bound each image side in pixels. ``extra`` accepts the remaining
    keys of ``DEFAULT_PARAMS``: object side as a fraction of the image's short side
    (``min_object_fraction``, ``max_object_fraction``), the largest share of a box another box
    may cover (``max_overlap``) and the share of noisy backgrounds (``noise_fraction``).
    """
    params = _resolve_params(
        num_train=num_train,
        num_val=num_val,
        num_categories=num_categories,
        min_size=min_size,
        max_size=max_size,
        min_objects=min_objects,
        max_objects=max_objects,
        empty_fraction=empty_fraction,
        seed=seed,
        **extra,
    )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_split(root, "train", params["num_train"], 1, params, split_index=0)
    _write_split(root, "val", params["num_val"], params["num_train"] + 1, params, split_index=1)
    return root


def default_cache_dir() -> Path:
    """``$DETR_LIGHTNING_CACHE`` if set, else ``~/.cache/detr_lightning``."""
    env = os.environ.get("DETR_LIGHTNING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "detr_lightning"


def ensure_synthetic_coco(cache_dir: str | os.PathLike | None = None, **params: Any) -> Path:
    """Path of the synthetic dataset for ``params``, generating it on first use.

    The dataset lives in ``cache_dir / synthetic-<hash of params>``. It is built in a temporary
    directory beside that and renamed into place, so a reader never sees a half-written dataset
    and several processes (e.g. DDP ranks) may call this at once: the first rename wins and the
    others discard their copy.
    """
    resolved = _resolve_params(**params)
    return cached_dataset("synthetic", FORMAT_VERSION, resolved, generate_synthetic_coco, cache_dir)


def cached_dataset(
    prefix: str,
    version: int,
    params: dict[str, Any],
    generate: Callable[..., Path],
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """``cache_dir / <prefix>-<hash of version and params>``, written by
    ``generate(directory, **params)`` on first use (see :func:`ensure_synthetic_coco`)."""
    key = json.dumps({"format": version, **params}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"{prefix}-{digest}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        generate(staging, **params)
        with open(staging / "params.json", "w") as f:
            f.write(key + "\n")
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m detr_lightning.data.synthetic --out DIR [--num-train N ...]``."""
    parser = argparse.ArgumentParser(description="Write the synthetic COCO-format shapes dataset.")
    parser.add_argument("--out", required=True, help="output directory (created if needed)")
    for key, value in DEFAULT_PARAMS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    print(generate_synthetic_coco(out, **args))


if __name__ == "__main__":
    main()
