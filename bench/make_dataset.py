"""Write the benchmark dataset: a COCO-format folder of photo-sized JPEGs (not the synthetic
training demo's small images), so that decoding, resizing and padding cost what they cost on
real data.

``python bench/make_dataset.py OUT [--train 1000] [--val 200] [--seed 0]``

Images follow COCO's size mix (long side 640; landscape 640x480 / 640x427 / 640x360, portrait
480x640 / 427x640 and square 640x640), saved as JPEG quality 90. Each shows a smooth random
background with sensor-like noise and 1..8 objects of 4 categories (ids 1..4: box, disc, wedge,
ring) in random colours, sizes from 12 px to half the image, partly overlapping. The layout is
the COCO 2017 one (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``).
The same arguments write byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZES = [(640, 480), (640, 427), (640, 360), (480, 640), (427, 640), (640, 640)]
SIZE_WEIGHTS = [0.45, 0.2, 0.1, 0.12, 0.05, 0.08]
CATEGORIES = [
    {"id": 1, "name": "box", "supercategory": "shape"},
    {"id": 2, "name": "disc", "supercategory": "shape"},
    {"id": 3, "name": "wedge", "supercategory": "shape"},
    {"id": 4, "name": "ring", "supercategory": "shape"},
]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.uniform(40, 215, size=(6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 9, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _draw_object(draw: ImageDraw.ImageDraw, category: int, box: list[float], colour) -> None:
    x0, y0, x1, y1 = box
    if category == 1:
        draw.rectangle(box, fill=colour)
    elif category == 2:
        draw.ellipse(box, fill=colour)
    elif category == 3:
        draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=colour)
    else:
        width = max(2.0, min(x1 - x0, y1 - y0) / 5)
        draw.ellipse(box, outline=colour, width=int(width))


def _image(rng: np.random.Generator, image_id: int, first_ann: int):
    width, height = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    annotations = []
    for k in range(int(rng.integers(1, 9))):
        side = float(np.exp(rng.uniform(np.log(12), np.log(min(width, height) / 2))))
        aspect = float(np.exp(rng.uniform(-0.6, 0.6)))
        w = min(side * aspect, width - 2.0)
        h = min(side / aspect, height - 2.0)
        x = float(rng.uniform(0, width - w))
        y = float(rng.uniform(0, height - h))
        category = int(rng.integers(1, 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        _draw_object(draw, category, [x, y, x + w, y + h], colour)
        annotations.append(
            {
                "id": first_ann + k,
                "image_id": image_id,
                "category_id": category,
                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                "area": round(w * h, 2),
                "iscrowd": 0,
            }
        )
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image, annotations


def write_split(root: Path, split: str, count: int, seed: int, first_id: int) -> None:
    rng = np.random.default_rng([seed, first_id])
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
        image, anns = _image(rng, image_id, len(annotations) + 1 + first_id * 10)
        name = f"{image_id:012d}.jpg"
        image.save(folder / name, quality=90)
        images.append(
            {"id": image_id, "file_name": name, "width": image.width, "height": image.height}
        )
        annotations.extend(anns)
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))


def write_dataset(root: Path, train: int, val: int, seed: int = 0) -> None:
    """Both splits under ``root`` (image ids: train from 1, val from 1000001)."""
    write_split(root, "train", train, seed, first_id=1)
    write_split(root, "val", val, seed, first_id=1_000_001)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_dataset(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.train} + {args.val} images to {args.out}")


if __name__ == "__main__":
    main()
