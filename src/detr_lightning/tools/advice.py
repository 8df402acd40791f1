"""Advice for training DETR on a dataset, derived from its numbers and the planned run.

The thresholds are rules of thumb and the advice says so; each piece names the setting to
change (``data.batch_size``, ``trainer.max_epochs``, ``model.num_queries``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..data.annotations import AnnotationScan

__all__ = ["TrainingPlan", "advise", "input_scales"]

SMALL_DATASET = 10_000  # training images below which fine-tuning beats training from ImageNet
MIN_FINETUNE_STEPS = 5_000  # optimizer steps that fine-tuning should at least take
MAX_SUGGESTED_EPOCHS = 500  # the paper's longest COCO schedule
MIN_STEPS_PER_EPOCH = 10
RARE_CATEGORY = 10  # training objects below which a category is hardly learned
SMALL_VAL_SPLIT = 200  # validation images below which AP is noisy
SMALL_SHARE = 0.5  # share of small boxes (at the model's input size) worth a remark
PRETRAINED_QUERIES = 100  # the released DETR checkpoints'


@dataclass
class TrainingPlan:
    """The settings of the planned training run (train.yaml's keys) that the data is checked
    and advised against."""

    batch_size: int = 8  # data.batch_size (global)
    num_queries: int = 100  # model.num_queries
    max_epochs: int | None = None  # trainer.max_epochs
    pretrained: str | None = None  # pretrained=...
    label_mapping: str = "contiguous"  # data.label_mapping
    strict: bool = False  # data.strict: boxes beyond their image are errors
    val_size: int = 800  # data.val_size: short side of evaluated images
    max_size: int = 1333  # data.max_size: long side cap
    lr_drop: bool = True  # the schedule drops the learning rate at schedule.lr_drop epochs


def input_scales(scan: AnnotationScan, val_size: int, max_size: int) -> np.ndarray:
    """float [N]: how much the evaluation resize (short side ``val_size``, long side at most
    ``max_size``) scales each image of the scan."""
    sizes = scan.image_sizes.astype(np.float64)
    short, long = sizes.min(axis=1).clip(min=1), sizes.max(axis=1).clip(min=1)
    return np.minimum(val_size / short, max_size / long)


def advise(scans: Mapping[str, AnnotationScan], plan: TrainingPlan) -> list[str]:
    """Advice for training on the splits ``scans`` ("train", "val") with ``plan``."""
    advice: list[str] = []
    train, val = scans.get("train"), scans.get("val")
    if train is not None and train.num_images:
        advice += _initialization(train.num_images, plan)
        advice += _schedule(train.num_images, plan)
        advice += _categories(train, plan)
    if any(scan.num_objects for scan in scans.values()):
        advice += _queries(scans, plan)
        advice += _box_sizes(scans, plan)
    if val is not None and 0 < val.num_images < SMALL_VAL_SPLIT:
        advice.append(
            f"The validation split has {val.num_images} images: its AP moves by points between "
            "runs and epochs, so compare runs on the same split and follow the trend in "
            "metrics.json rather than single epochs."
        )
    return advice


def _initialization(num_images: int, plan: TrainingPlan) -> list[str]:
    if plan.pretrained:
        return []
    if num_images < SMALL_DATASET:
        return [
            f"{num_images} training images are few for DETR from ImageNet weights (the paper "
            "trains 300-500 epochs on COCO's 118k images): fine-tune a released checkpoint, "
            "e.g. experiment=finetune_custom pretrained=weights/detr-r50-e632da11.pth "
            "(docs/pretrained.md); its class head is re-initialized for your categories."
        ]
    return [
        f"{num_images} training images: training from ImageNet weights (the base recipe) is "
        "possible but takes hundreds of epochs; fine-tuning a released checkpoint "
        "(pretrained=...) converges in tens."
    ]


def _schedule(num_images: int, plan: TrainingPlan) -> list[str]:
    advice = []
    steps = math.ceil(num_images / plan.batch_size)
    smaller = max(2, min(8, num_images // MIN_STEPS_PER_EPOCH))
    if steps < MIN_STEPS_PER_EPOCH and smaller < plan.batch_size:
        advice.append(
            f"data.batch_size={plan.batch_size} (global) leaves {steps} optimizer step(s) per "
            f"epoch for {num_images} images: data.batch_size={smaller} gives "
            f"{math.ceil(num_images / smaller)}, and small batches suit fine-tuning DETR."
        )
    elif num_images < SMALL_DATASET and plan.batch_size > 16:
        advice.append(
            f"data.batch_size={plan.batch_size} is a COCO-scale batch (the paper: 64); for "
            f"{num_images} images a global batch of 4-8 (finetune_custom: 4) gives "
            f"{math.ceil(num_images / 8)}-{math.ceil(num_images / 4)} steps per epoch instead "
            f"of {steps}."
        )
    if not plan.pretrained and num_images >= SMALL_DATASET:
        return advice  # the paper's schedule applies
    epochs = plan.max_epochs if plan.max_epochs and plan.max_epochs > 0 else None
    total = steps * epochs if epochs else 0
    if total >= MIN_FINETUNE_STEPS:
        advice.append(
            f"At {steps} steps per epoch, trainer.max_epochs={epochs} makes {total} steps: "
            "enough for fine-tuning; stop earlier when validation AP plateaus (metrics.json, "
            "curves.png)."
        )
        return advice
    needed = math.ceil(MIN_FINETUNE_STEPS / steps)
    planned = f"trainer.max_epochs={epochs} makes {total} steps" if epochs else "no epoch limit"
    rule = (
        f"fine-tuning DETR needs a few thousand optimizer steps (the class head starts from "
        f"scratch and set matching settles slowly; a rule of thumb: {MIN_FINETUNE_STEPS})"
    )
    if needed <= MAX_SUGGESTED_EPOCHS:
        suggestion = f"trainer.max_epochs={needed}" + (
            f" with schedule.lr_drop={max(1, round(0.8 * needed))}"
            if plan.lr_drop
            else " (the schedule follows the run's length)"
        )
    else:
        suggestion = (
            f"that is {needed} epochs here: with so few images more annotated images help more "
            f"than more epochs; train up to {MAX_SUGGESTED_EPOCHS} epochs and stop when the "
            "validation AP stops rising"
        )
    advice.append(f"At {steps} steps per epoch, {planned}; {rule}: {suggestion}.")
    return advice


def _categories(train: AnnotationScan, plan: TrainingPlan) -> list[str]:
    advice = []
    rare = [
        f"{train.categories[c]} ({train.instances[c]})"
        for c in sorted(train.categories)
        if 0 < train.instances[c] < RARE_CATEGORY
    ]
    if rare:
        advice.append(
            f"Categories with fewer than {RARE_CATEGORY} training objects are rarely learned: "
            f"{', '.join(rare[:10])}{' ...' if len(rare) > 10 else ''}; annotate more of them, "
            "or merge them into related categories."
        )
    ids = sorted(train.categories)
    if ids and plan.label_mapping == "category_id" and max(ids) + 1 > len(ids):
        advice.append(
            f"data.label_mapping=category_id gives num_classes = max id + 1 = {max(ids) + 1} "
            f"for {len(ids)} categories; data.label_mapping=contiguous (finetune_custom's) "
            "has one class per category. Keep category_id only to reuse the released 91-class "
            "COCO heads as they are."
        )
    return advice


def _queries(scans: Mapping[str, AnnotationScan], plan: TrainingPlan) -> list[str]:
    most = max(int(scan.objects_per_image.max(initial=0)) for scan in scans.values())
    if most > plan.num_queries:
        note = (
            f" The released checkpoints have {PRETRAINED_QUERIES} queries, and pretrained=... "
            "loads only into a model with as many."
            if plan.pretrained
            else ""
        )
        return [
            f"An image has {most} objects but the model {plan.num_queries} queries: set "
            f"model.num_queries above {most} (about {math.ceil(1.5 * most)} leaves room for "
            f"the duplicates DETR learns to suppress).{note}"
        ]
    if not plan.pretrained and plan.num_queries >= 4 * max(most, 5):
        return [
            f"At most {most} objects per image: model.num_queries={plan.num_queries} could be "
            f"lowered (e.g. to {max(10, 3 * most)}) when training from ImageNet weights; keep "
            f"{PRETRAINED_QUERIES} to fine-tune the released checkpoints."
        ]
    return []


def _box_sizes(scans: Mapping[str, AnnotationScan], plan: TrainingPlan) -> list[str]:
    small = total = 0
    for scan in scans.values():
        counts = scan.size_counts(input_scales(scan, plan.val_size, plan.max_size))
        small, total = small + counts["small"], total + sum(counts.values())
    if not total or small / total <= SMALL_SHARE:
        return []
    return [
        f"{small / total:.0%} of the boxes are under 32x32 px even at the model's input size "
        f"(short side data.val_size={plan.val_size}): DETR is weakest on small objects (the "
        "paper's R50: AP_S 20.5 against AP_L 61.1). The DC5 models (model=detr_r101_dc5, or "
        "backbone.dilation=true) and larger data.scales / data.val_size help, at a higher "
        "memory cost."
    ]
