"""COCO evaluation time through our CocoEvaluator: faster_coco_eval against pycocotools.

    PYTHONPATH=src python bench/eval_backends.py [--images 5000] [--detections 100] [--rounds 3] \
        [--json bench/results/evaluation_cpu.json]

A COCO-sized ground truth (``--images`` images of 640x480, 1..15 objects each over 80
categories, COCO's mix of small/medium/large boxes and 1% crowd regions) and ``--detections``
per image (jittered ground truth plus random false positives, random scores), as a validation
pass would give them. Each round times ``update`` for every image plus ``compute`` (gather,
COCO results, loading the annotation file, evaluate, accumulate, summarize, per-class AP) for
each backend in turn; the 12 statistics of both are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json

from detr_lightning.evaluation.evaluator import COCO_METRIC_KEYS, CocoEvaluator


def make_split(folder: Path, images: int, detections: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, 81)]
    entries, annotations, batches = [], [], []
    for image_id in range(1, images + 1):
        entries.append(
            {"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"}
        )
        count = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=count))
        wh = np.stack([side * rng.uniform(0.6, 1.4, count), side * rng.uniform(0.6, 1.4, count)], 1)
        wh = np.minimum(wh, [639, 479])
        xy = rng.uniform(0, 1, (count, 2)) * ([640, 480] - wh)
        cats = rng.integers(1, 81, count)
        for k in range(count):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cats[k]),
                "bbox": [*map(float, xy[k]), *map(float, wh[k])], "area": float(wh[k].prod()),
                "iscrowd": int(rng.random() < 0.01),
            })  # fmt: skip
        false = detections - count
        fxy = rng.uniform(0, 600, (false, 2))
        fwh = rng.uniform(5, 200, (false, 2))
        jitter = rng.normal(0, 0.05, (count, 4)) * np.concatenate([wh, wh], 1)
        xyxy = np.concatenate([
            np.concatenate([xy, xy + wh], 1) + jitter, np.concatenate([fxy, fxy + fwh], 1)
        ])  # fmt: skip
        labels = np.concatenate([cats - 1, rng.integers(0, 80, false)])
        scores = rng.random(detections)
        scores[:count] = scores[:count] * 0.5 + 0.5
        batches.append((
            {"image_id": image_id, "stand_in_for": -1},
            {"boxes": torch.from_numpy(xyxy).float(), "labels": torch.from_numpy(labels),
             "scores": torch.from_numpy(scores).float()},
        ))  # fmt: skip
    file = folder / "instances_val.json"
    file.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": categories}))  # fmt: skip
    return file, [c["id"] for c in categories], batches


def run(backend: str, file: Path, category_ids: list[int], batches) -> tuple[float, dict]:
    started = time.perf_counter()
    evaluator = CocoEvaluator(file, category_ids, backend=backend)
    for target, detection in batches:
        evaluator.update([target], [detection])
    result = evaluator.compute()
    return time.perf_counter() - started, result.stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    backends = ["pycocotools", "faster_coco_eval"]
    with tempfile.TemporaryDirectory() as folder:
        file, category_ids, batches = make_split(Path(folder), args.images, args.detections)
        times: dict[str, list[float]] = {b: [] for b in backends}
        stats = {}
        for _ in range(args.rounds):
            for backend in backends:
                seconds, stats[backend] = run(backend, file, category_ids, batches)
                times[backend].append(seconds)
    worst = max(
        abs(stats["pycocotools"][k] - stats["faster_coco_eval"][k]) for k in COCO_METRIC_KEYS
    )
    base = statistics.median(times["pycocotools"])
    rows = [
        [b, f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})",
         f"{base / statistics.median(t):.2f}x"]
        for b, t in times.items()
    ]  # fmt: skip
    table = print_table(
        f"COCO evaluation, {args.images} images x {args.detections} detections "
        f"(AP {stats['pycocotools']['map']:.3f}; largest difference of the 12 statistics "
        f"{worst:.1e})",
        ["backend", "seconds median (min-max)", "speedup"],
        rows,
    )
    write_json(args.json, {"environment": environment(), "seconds": times, "stats": stats,
                           "max_stat_difference": worst, "table": table})  # fmt: skip


if __name__ == "__main__":
    main()
