"""Panoptic quality (PQ, SQ, RQ; Kirillov et al. 2019) as the COCO panoptic evaluation
(panopticapi's ``pq_compute``) computes it, VOID and crowd regions included.

Per image, with ground truth and prediction given as segment id maps and segment lists:

- a predicted segment's area is its pixel count in the map (every id in the map but 0 must be
  listed, and every listed id must have pixels); a ground-truth segment's area is the one its
  annotation states;
- a ground-truth segment (not crowd) and a predicted one of the same category match when
  ``IoU > 0.5``, where the union leaves out the predicted pixels that lie on VOID ground
  truth (id 0): ``union = area_pred + area_gt - intersection - pred_on_void``. A match is a
  true positive; its IoU goes into the sums; ground-truth ids that the annotation does not
  list take part in nothing;
- unmatched ground-truth segments that are not crowd are false negatives;
- an unmatched predicted segment is a false positive unless more than half of it lies on VOID
  plus the crowd region of its category in that image (the last crowd segment of that
  category listed, as there);
- per category: ``PQ = sum IoU / (TP + FP / 2 + FN / 2)``, ``SQ = sum IoU / TP`` (0 without
  TP), ``RQ = TP / (TP + FP / 2 + FN / 2)``; PQ, SQ, RQ of all / things / stuff are the means
  over the categories with any TP, FP or FN.

Counts are kept per image (:class:`PanopticStats`) and summed in image-id order, so
any split of the images over processes, with repeats, gives the same figures.

torchmetrics' ``PanopticQuality`` is not this computation: it has no crowd regions (a
prediction on a crowd region is a false positive there) and its union does not leave out
the predicted pixels on VOID, so its PQ is lower on COCO and differs on any data with
crowd or unlabeled pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.panoptic import read_segment_ids

VOID = 0
_OFFSET = 1 << 32  # pairs of (ground truth id, predicted id) as one integer


@dataclass
class CategoryCounts:
    """One category's sums: IoU of the true positives, TP, FP, FN."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


@dataclass
class PanopticStats:
    """Per image and category counts; ``+`` merges (an image seen twice counts once)."""

    images: dict[int, dict[int, CategoryCounts]] = field(default_factory=dict)

    def add_image(self, image_id: int, counts: Mapping[int, CategoryCounts]) -> None:
        self.images[int(image_id)] = dict(counts)

    def __add__(self, other: PanopticStats) -> PanopticStats:
        return PanopticStats({**self.images, **other.images})

    def totals(self) -> dict[int, CategoryCounts]:
        """Sums per category over the images, in image-id order (the same float sums
        whichever process held which image)."""
        totals: dict[int, CategoryCounts] = {}
        for image_id in sorted(self.images):
            for category, counts in self.images[image_id].items():
                total = totals.setdefault(category, CategoryCounts())
                total.iou += counts.iou
                total.tp += counts.tp
                total.fp += counts.fp
                total.fn += counts.fn
        return totals


def image_counts(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
    categories: Mapping[int, Mapping[str, Any]],
    image: str = "image",
) -> dict[int, CategoryCounts]:
    """One image's counts per category (see the module docstring).

    gt_ids, pred_ids: [H, W] integer segment ids; segments: dicts with ``id``,
    ``category_id`` (ground truth also ``iscrowd`` and ``area``); categories: id -> dict.
    ``image`` names the image in errors.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"{image}: ground truth {gt_ids.shape} and prediction "
                         f"{pred_ids.shape} differ in size")  # fmt: skip
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): dict(s) for s in pred_segments}
    labels, areas = np.unique(pred_ids, return_counts=True)
    unseen = set(pred)
    for label, area in zip(labels.tolist(), areas.tolist()):
        if label not in pred:
            if label == VOID:
                continue
            raise ValueError(f"{image}: segment id {label} is in the prediction's PNG but "
                             "not in its segments_info")  # fmt: skip
        if pred[label]["category_id"] not in categories:
            raise ValueError(f"{image}: predicted segment {label} has unknown category_id "
                             f"{pred[label]['category_id']}")  # fmt: skip
        pred[label]["area"] = area
        unseen.discard(label)
    if unseen:
        raise ValueError(f"{image}: segment ids {sorted(unseen)} are in the prediction's "
                         "segments_info but have no pixels in its PNG")  # fmt: skip

    pairs, overlaps = np.unique(
        gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64), return_counts=True
    )
    overlap = {(int(p // _OFFSET), int(p % _OFFSET)): int(n) for p, n in zip(pairs, overlaps)}
    # predicted pixels on VOID ground truth (id 0; ground-truth ids that the annotation does
    # not list take part in nothing)
    on_void = {pred_label: count for (gt_label, pred_label), count in overlap.items()
               if gt_label == VOID}  # fmt: skip

    counts: dict[int, CategoryCounts] = {}
    matched_gt, matched_pred = set(), set()
    for (gt_label, pred_label), intersection in overlap.items():
        if gt_label not in gt or pred_label not in pred:
            continue
        truth, guess = gt[gt_label], pred[pred_label]
        if truth.get("iscrowd", 0) == 1 or truth["category_id"] != guess["category_id"]:
            continue
        union = guess["area"] + truth["area"] - intersection - on_void.get(pred_label, 0)
        iou = intersection / union
        if iou > 0.5:
            category = counts.setdefault(truth["category_id"], CategoryCounts())
            category.tp += 1
            category.iou += iou
            matched_gt.add(gt_label)
            matched_pred.add(pred_label)

    crowd_of_category: dict[int, int] = {}
    for label, truth in gt.items():
        if truth.get("iscrowd", 0) == 1:
            crowd_of_category[truth["category_id"]] = label
        elif label not in matched_gt:
            counts.setdefault(truth["category_id"], CategoryCounts()).fn += 1
    for label, guess in pred.items():
        if label in matched_pred:
            continue
        ignored = on_void.get(label, 0)
        crowd = crowd_of_category.get(guess["category_id"])
        if crowd is not None:
            ignored += overlap.get((crowd, label), 0)
        if ignored / guess["area"] > 0.5:
            continue
        counts.setdefault(guess["category_id"], CategoryCounts()).fp += 1
    return counts


def summarize(
    totals: Mapping[int, CategoryCounts], categories: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """PQ, SQ, RQ (and ``n``, the categories averaged) of ``all``, ``things`` and ``stuff``,
    and ``per_class`` {category id: pq, sq, rq} (zeros for a category never seen), from
    per-category sums."""
    per_class: dict[int, dict[str, float]] = {}
    counted = set()  # categories with any TP, FP or FN: those averaged
    for category_id in categories:
        c = totals.get(category_id, CategoryCounts())
        if c.tp + c.fp + c.fn == 0:
            per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        counted.add(category_id)
        denominator = c.tp + 0.5 * c.fp + 0.5 * c.fn
        per_class[category_id] = {
            "pq": c.iou / denominator,
            "sq": c.iou / c.tp if c.tp else 0.0,
            "rq": c.tp / denominator,
        }
    result: dict[str, Any] = {}
    for name, isthing in (("all", None), ("things", True), ("stuff", False)):
        chosen = [
            per_class[c]
            for c, info in categories.items()
            if c in counted and (isthing is None or bool(info.get("isthing", 1)) == isthing)
        ]
        n = len(chosen)
        result[name] = {
            key: sum(row[key] for row in chosen) / n if n else 0.0 for key in ("pq", "sq", "rq")
        } | {"n": n}
    result["per_class"] = per_class
    return result


def pq_from_files(
    gt_json: str | Path,
    pred_json: str | Path,
    gt_folder: str | Path | None = None,
    pred_folder: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`summarize` of a COCO panoptic results file against the ground truth, as
    panopticapi's ``pq_compute(gt_json, pred_json, gt_folder, pred_folder)`` (folders default
    to the JSON files' names without ``.json``). Every ground-truth image needs a
    prediction."""
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt_folder = Path(gt_folder) if gt_folder else gt_json.with_suffix("")
    pred_folder = Path(pred_folder) if pred_folder else pred_json.with_suffix("")
    gt_data = json.loads(gt_json.read_text())
    pred_data = json.loads(pred_json.read_text())
    categories = {c["id"]: c for c in gt_data["categories"]}
    predictions = {a["image_id"]: a for a in pred_data["annotations"]}
    stats = PanopticStats()
    for annotation in gt_data["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in predictions:
            raise ValueError(f"{pred_json}: no prediction for image {image_id}")
        prediction = predictions[image_id]
        counts = image_counts(
            read_segment_ids(gt_folder / annotation["file_name"]),
            annotation["segments_info"],
            read_segment_ids(pred_folder / prediction["file_name"]),
            prediction["segments_info"],
            categories,
            image=f"image {image_id}",
        )
        stats.add_image(image_id, counts)
    return summarize(stats.totals(), categories)


def merge_stats(parts: Iterable[PanopticStats]) -> PanopticStats:
    """One :class:`PanopticStats` of several processes' (an image in two counts once)."""
    merged = PanopticStats()
    for part in parts:
        merged = merged + part
    return merged
