"""Data pipeline: images/s of one data-loader worker, ours against the official PIL pipeline.

    PYTHONPATH=src python bench/data.py --official /path/to/detr-checkout [--data ROOT] \
        [--images 200] [--rounds 5] [--json bench/results/data_cpu.json]

Both read the same JPEGs and apply the full training augmentation at the benchmark's small
scale (see bench/train_speed.py): flip; short side 128..192, max 256; half of the time resize to
96/128/160 and a random crop of 80..160 first; normalize. Ours is ``CocoDetection`` with
``make_train_transforms`` (seeded per sample, as training runs it); the official one is its
``datasets.coco.CocoDetection`` with its ``datasets.transforms`` composed the same way (PIL
decode and resize, ``ToTensor``, ``Normalize``). One thread, as in a worker. Rounds alternate
ours / official over the same images, so background load hits both; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_dataset, environment, print_table, write_json

SCALES = [128, 144, 160, 176, 192]
CROP_RESIZE = [96, 128, 160]


def ours(root: Path):
    from detr_lightning.data.coco import CocoDetection
    from detr_lightning.data.presets import make_train_transforms

    transforms = make_train_transforms(
        scales=SCALES, max_size=256, crop_resize=CROP_RESIZE, crop_min=80, crop_max=160
    )
    dataset = CocoDetection(
        root / "train2017",
        root / "annotations/instances_train2017.json",
        transforms=transforms,
        label_mapping="category_id",
    )
    return lambda index: dataset[(index, 1000 + index)]


def official(root: Path, checkout: str):
    sys.path.insert(0, os.path.abspath(checkout))
    import datasets.coco as dcoco
    import datasets.transforms as T

    normalize = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    crop = T.Compose([T.RandomResize(CROP_RESIZE), T.RandomSizeCrop(80, 160),
                      T.RandomResize(SCALES, max_size=256)])  # fmt: skip
    transforms = T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomSelect(T.RandomResize(SCALES, max_size=256), crop),
        normalize,
    ])  # fmt: skip
    dataset = dcoco.CocoDetection(
        root / "train2017", root / "annotations/instances_train2017.json",
        transforms=transforms, return_masks=False,
    )  # fmt: skip
    return lambda index: dataset[index]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", default=os.environ.get("REF_DETR_DIR"))
    parser.add_argument("--data")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not (args.official and Path(args.official, "main.py").is_file()):
        parser.error("give the official DETR checkout with --official (or $REF_DETR_DIR)")
    torch.set_num_threads(1)
    root = ensure_dataset(args.data)
    pipelines = {"official": official(root, args.official), "detr-lightning": ours(root)}
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for load in pipelines.values():  # warm-up: file cache, lazy imports
        for index in range(20):
            load(index)
    for _ in range(args.rounds):
        for name, load in pipelines.items():
            started = time.perf_counter()
            for index in range(args.images):
                load(index)
            times[name].append(args.images / (time.perf_counter() - started))
    base = statistics.median(times["official"])
    rows = []
    for name, speeds in times.items():
        median = statistics.median(speeds)
        rows.append([name, f"{median:.1f} ({min(speeds):.1f}-{max(speeds):.1f})",
                     f"{1000 / median:.2f}", f"{median / base:.2f}x"])  # fmt: skip
    table = print_table(
        f"Data pipeline, one worker thread, {args.images} images x {args.rounds} rounds",
        ["pipeline", "img/s median (min-max)", "ms/img", "ratio"],
        rows,
    )
    write_json(args.json, {"environment": environment(), "images_per_s": times, "table": table})


if __name__ == "__main__":
    main()
