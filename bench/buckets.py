"""Padded batch shapes of one training epoch: how many distinct shapes, and what share of the
pixels is padding, for each ``data.pad_to`` (each batch its own size, steps, canvas lists).

    PYTHONPATH=src python bench/buckets.py [--data ROOT] [--batch 4] [--epochs 2] \
        [--json bench/results/<host>/buckets.json]

The training split of the benchmark dataset (COCO's mix of image sizes, see
bench/make_dataset.py; written once into bench/.data) with the paper's augmentation (flip,
short side 480..800, long side <= 1333, half of the time a crop first), batched as training
batches it (``EpochSeededSampler``: per-sample seeds, size grouping within windows of 32
batches, ``--batch`` images per device). Sizes come from the augmentation's own size
prediction (no image is decoded), so the counts are exact for these seeds. A captured graph
or a compiled kernel set is made per shape: fewer shapes, fewer captures; more padding, more
compute per image.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_dataset, environment, print_table, write_json

from detr_lightning.data.coco import CocoDetection
from detr_lightning.data.presets import make_train_transforms
from detr_lightning.data.sampler import EpochSeededSampler
from detr_lightning.ops.padding import canvas_size, parse_pad_to

# landscape and portrait canvases at the paper's scales, plus a square one for the crops
CANVASES = [[512, 704], [608, 832], [704, 960], [800, 1088], [800, 1344],
            [704, 512], [832, 608], [960, 704], [1088, 800], [1344, 800], [800, 800]]  # fmt: skip
VARIANTS: dict[str, Any] = {"own size (today)": None, "step 32": 32, "step 64": 64,
                            "step 128": 128, "step 256": 256, "11 canvases": CANVASES}  # fmt: skip


def epoch_batches(dataset: CocoDetection, batch: int, epoch: int, grouped: bool) -> list:
    sampler = EpochSeededSampler(
        dataset, seed=0, group_batch_size=batch if grouped else None,
        size_of=(lambda index, seed: dataset.output_size((index, seed))) if grouped else None,
    )  # fmt: skip
    sampler.set_epoch(epoch)
    keys = list(sampler)
    return [[dataset.output_size(key) for key in keys[k : k + batch]]
            for k in range(0, len(keys), batch)]  # fmt: skip


def measure(batches: list, pad_to: Any) -> dict[str, Any]:
    pad_to = parse_pad_to(pad_to)
    shapes: Counter[tuple[int, int]] = Counter()
    image_pixels = canvas_pixels = outside = 0
    for sizes in batches:
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        canvas = canvas_size(height, width, pad_to)
        if canvas is None:
            outside += 1
            canvas = (height, width)
        shapes[canvas] += 1
        image_pixels += sum(h * w for h, w in sizes)
        canvas_pixels += canvas[0] * canvas[1] * len(sizes)
    return {"shapes": len(shapes), "padding": 1 - image_pixels / canvas_pixels,
            "batches": len(batches), "outside": outside,
            "common": [[list(shape), n] for shape, n in shapes.most_common(5)]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a COCO-layout folder (default: the benchmark dataset)")
    parser.add_argument("--batch", type=int, default=4, help="images per device and batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = ensure_dataset(args.data)
    annotations = root / "annotations/instances_train2017.json"
    dataset = CocoDetection(root / "train2017", annotations, transforms=make_train_transforms(),
                            label_mapping="category_id")  # fmt: skip
    rows, results = [], []
    for grouped in (False, True):
        epochs = [epoch_batches(dataset, args.batch, e, grouped) for e in range(args.epochs)]
        for name, pad_to in VARIANTS.items():
            if not grouped and pad_to is not None:
                continue
            per_epoch = [measure(batches, pad_to) for batches in epochs]
            label = name + ("" if grouped else ", no size grouping")
            result = {"variant": label, "pad_to": pad_to, "grouped": grouped, "epochs": per_epoch}
            results.append(result)
            rows.append([label, " / ".join(str(e["shapes"]) for e in per_epoch),
                         " / ".join(f"{e['padding']:.1%}" for e in per_epoch),
                         str(sum(e["outside"] for e in per_epoch))])  # fmt: skip
    print_table(
        f"Padded batch shapes per epoch, {len(dataset)} images, batch {args.batch}, "
        f"epochs 0..{args.epochs - 1}",
        ["pad_to", "distinct shapes", "padding share", "batches outside the canvases"],
        rows,
    )
    write_json(args.json, {"environment": environment(), "args": {"batch": args.batch,
               "epochs": args.epochs, "data": str(root)}, "results": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
