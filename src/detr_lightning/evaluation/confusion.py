"""Detection confusion matrix: which classes a thresholded detector confuses, misses or invents.

Layout: ``counts[i, j]`` counts objects of true class ``i`` (row) predicted as class ``j``
(column), classes ``0 .. C-1`` in label order; index ``C`` is "background". So row ``i`` sums to
the objects of class ``i`` (its last cell: missed, true class -> background) and column ``j`` to
the predictions of class ``j`` (its last cell: false positives, background -> predicted class);
``counts[C, C]`` is always 0. :meth:`ConfusionMatrix.normalized` divides each row by its sum:
a class row gives the share of its objects found as each class or missed, the background row
the share of the false positives per predicted class.

Matching, per image:

1. Predictions with ``score >= score_threshold`` are kept; the others do not exist here.
2. Every pair of a kept prediction and a non-crowd ground-truth box with
   ``IoU >= iou_threshold`` (``torchvision.ops.box_iou``) is a candidate, whatever the classes.
3. Candidates are taken greedily, each box at most once: pairs of the same class first, then by
   descending IoU (ties: higher score, then file order). A matched pair counts in (true class,
   predicted class): the diagonal if the classes agree, a confusion if not.
4. Unmatched ground truth counts as missed, unmatched predictions as false positives, except a
   prediction that lies in a crowd region (``iscrowd=1``): one whose intersection with the
   region covers at least ``iou_threshold`` of its own area (COCOeval's overlap for crowd
   regions) is ignored, neither counted nor a false positive, whatever the two classes. Crowd
   regions are never missed.

This is the convention of supervision's ``ConfusionMatrix`` (0.31; rows true, columns predicted,
same-class pairs first, then by IoU), with COCOeval's treatment of crowd regions added and the
IoU threshold inclusive (supervision and Ultralytics match at ``IoU > threshold``). Ultralytics'
matrix is transposed (rows predicted) and matches by IoU alone, so two overlapping objects of
different classes can swap their predictions there. Score order (as COCOeval matches within a
class) was not chosen: once the threshold is applied, every kept prediction is a claim of the
detector, and pairing by overlap keeps a confident but poorly placed box from taking an object
away from a better placed one.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

from ..utils.io import write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["BACKGROUND", "ConfusionMatrix", "confusion_from_coco"]

BACKGROUND = "background"  # the name of the last row and column


def _as_tensor(values: Any, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> Tensor:
    """``values`` as a CPU tensor of ``dtype``, checked against ``shape`` (-1: any size)."""
    tensor = torch.as_tensor(values, dtype=dtype).detach().cpu()
    if tensor.numel() == 0 and len(shape) == 2:
        tensor = tensor.reshape(0, shape[1])
    if tensor.dim() != len(shape) or any(s not in (-1, t) for s, t in zip(shape, tensor.shape)):
        expected = "[" + ", ".join("N" if s == -1 else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    return tensor


def _intersection_over_first(boxes: Tensor, regions: Tensor) -> Tensor:
    """[P, 4] and [R, 4] xyxy -> [P, R]: the share of each box's area inside each region."""
    top_left = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / box_area(boxes).clamp(min=torch.finfo(boxes.dtype).tiny)[:, None]


class ConfusionMatrix:
    """Accumulates the detection confusion matrix over images (see the module docstring).

    Args:
        class_names: name of each class label ``0 .. C-1``.
        score_threshold: predictions with a lower score are left out.
        iou_threshold: the least IoU of a match (and the least share of a prediction's area
            inside a crowd region to ignore it).
        category_ids: dataset category id of each label, if any (written to the JSON).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        score_threshold: float = 0.5,
        iou_threshold: float = 0.5,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
        if category_ids is not None and len(category_ids) != len(class_names):
            raise ValueError(
                f"got {len(category_ids)} category ids for {len(class_names)} class names; "
                "pass one category id per class"
            )
        self.class_names = [str(name) for name in class_names]
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        size = len(self.class_names) + 1
        self.counts = np.zeros((size, size), dtype=np.int64)
        self.num_images = 0
        self.num_crowd_ignored = 0  # kept predictions ignored inside crowd regions

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list[str]:
        """Row and column names: the class names, then "background"."""
        return [*self.class_names, BACKGROUND]

    def update(
        self,
        pred_boxes: Tensor | Sequence,
        pred_scores: Tensor | Sequence,
        pred_labels: Tensor | Sequence,
        gt_boxes: Tensor | Sequence,
        gt_labels: Tensor | Sequence,
        gt_crowd: Tensor | Sequence | None = None,
    ) -> None:
        """Count one image.

        pred_boxes [P, 4] and gt_boxes [G, 4] xyxy in the same units (e.g. pixels);
        pred_scores [P]; pred_labels [P] and gt_labels [G] class labels in ``0 .. C-1``;
        gt_crowd [G] bool (default: no crowd region).
        """
        pred_boxes = _as_tensor(pred_boxes, torch.float64, (-1, 4), "pred_boxes")
        scores = _as_tensor(pred_scores, torch.float64, (len(pred_boxes),), "pred_scores")
        pred_labels = _as_tensor(pred_labels, torch.int64, (len(pred_boxes),), "pred_labels")
        gt_boxes = _as_tensor(gt_boxes, torch.float64, (-1, 4), "gt_boxes")
        gt_labels = _as_tensor(gt_labels, torch.int64, (len(gt_boxes),), "gt_labels")
        if gt_crowd is None:
            gt_crowd = torch.zeros(len(gt_boxes), dtype=torch.bool)
        gt_crowd = _as_tensor(gt_crowd, torch.bool, (len(gt_boxes),), "gt_crowd")
        for name, labels in (("pred_labels", pred_labels), ("gt_labels", gt_labels)):
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"{name} must lie in [0, {self.num_classes - 1}] (one per class name), got "
                    f"values in [{int(labels.min())}, {int(labels.max())}]"
                )

        keep = scores >= self.score_threshold
        pred_boxes, scores, pred_labels = pred_boxes[keep], scores[keep], pred_labels[keep]
        crowd_boxes = gt_boxes[gt_crowd]
        gt_boxes, gt_labels = gt_boxes[~gt_crowd], gt_labels[~gt_crowd]
        background = self.num_classes

        gt_matched = np.zeros(len(gt_boxes), dtype=bool)
        pred_matched = np.zeros(len(pred_boxes), dtype=bool)
        if len(gt_boxes) and len(pred_boxes):
            iou = box_iou(gt_boxes, pred_boxes).numpy()  # [G, P]
            gt_index, pred_index = np.nonzero(iou >= self.iou_threshold)
            same_class = gt_labels.numpy()[gt_index] == pred_labels.numpy()[pred_index]
            # np.lexsort sorts by its last key first: same class first, then IoU and score
            # descending, then file order
            order = np.lexsort(
                (pred_index, gt_index, -scores.numpy()[pred_index],
                 -iou[gt_index, pred_index], ~same_class)
            )  # fmt: skip
            for g, p in zip(gt_index[order].tolist(), pred_index[order].tolist()):
                if gt_matched[g] or pred_matched[p]:
                    continue
                gt_matched[g] = pred_matched[p] = True
                self.counts[int(gt_labels[g]), int(pred_labels[p])] += 1
        for label in gt_labels[torch.from_numpy(~gt_matched)].tolist():
            self.counts[label, background] += 1
        unmatched = torch.from_numpy(~pred_matched)
        if len(crowd_boxes) and unmatched.any():
            overlap = _intersection_over_first(pred_boxes, crowd_boxes)
            in_crowd = (overlap >= self.iou_threshold).any(1) & unmatched
            self.num_crowd_ignored += int(in_crowd.sum())
            unmatched &= ~in_crowd
        for label in pred_labels[unmatched].tolist():
            self.counts[background, label] += 1
        self.num_images += 1

    def normalized(self) -> np.ndarray:
        """float64 [C+1, C+1]: each row divided by its sum (rows without counts stay 0)."""
        totals = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON content: names, thresholds, counts, normalized rows and totals."""
        counts = self.counts
        return {
            "class_names": self.labels,
            "category_ids": None if self.category_ids is None else [*self.category_ids, None],
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "layout": (
                "counts[i][j]: objects of true class i (row) predicted as class j (column); "
                "the last row and column are background: column = missed objects, "
                "row = false positives"
            ),
            "normalization": "each row divided by its sum (rows without counts are 0)",
            "counts": counts.tolist(),
            "normalized": self.normalized().tolist(),
            "num_images": self.num_images,
            "num_ground_truth": int(counts[: self.num_classes].sum()),
            "num_predictions": int(counts[:, : self.num_classes].sum()),
            "num_crowd_ignored_predictions": self.num_crowd_ignored,
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        """:meth:`to_dict` written atomically to ``path``."""
        return write_json_atomic(path, self.to_dict())


def confusion_from_coco(
    ground_truth: Mapping[str, Any],
    results: Iterable[Mapping[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> ConfusionMatrix:
    """The confusion matrix of COCO results against a COCO instances file.

    ``ground_truth`` is the parsed instances JSON (``bbox`` absolute xywh, ``iscrowd``), its
    categories sorted by id giving the classes; ``results`` the COCO results format
    (``image_id``, ``category_id``, absolute xywh ``bbox``, ``score``), as ``predictions.json``.
    ``image_ids``: the images evaluated (default: all of the file); an image without results
    has its objects missed, results of other images are left out. Results of a category that
    the file does not declare are left out too (COCOeval ignores them), with a log message.
    """
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in ground_truth["categories"]}
    category_ids = sorted(names)
    label_of = {category: label for label, category in enumerate(category_ids)}
    matrix = ConfusionMatrix(
        [names[c] for c in category_ids],
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        category_ids=category_ids,
    )
    if image_ids is None:
        image_ids = [int(image["id"]) for image in ground_truth["images"]]
    evaluated = sorted({int(i) for i in image_ids})
    objects: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for annotation in ground_truth.get("annotations", []):
        if int(annotation["category_id"]) not in label_of:
            raise ValueError(
                f"annotation {annotation.get('id')} has category_id {annotation['category_id']}, "
                f"which is not among the file's categories {category_ids}; add the category to "
                "'categories' or fix the annotation"
            )
        objects[int(annotation["image_id"])].append(annotation)
    detections: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    other_categories = 0
    for result in results:
        if float(result["score"]) < matrix.score_threshold:
            continue  # most of them: no need to group them
        if int(result["category_id"]) not in label_of:
            other_categories += 1
            continue
        detections[int(result["image_id"])].append(result)
    if other_categories:
        log.info(
            "confusion matrix: %d prediction(s) above the score threshold are of categories "
            "that the annotation file does not declare; they are left out (as in COCOeval)",
            other_categories,
        )

    def xyxy(entries: list[Mapping[str, Any]]) -> Tensor:
        boxes = torch.tensor([e["bbox"] for e in entries], dtype=torch.float64).reshape(-1, 4)
        return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)

    for image_id in evaluated:
        gts, preds = objects.get(image_id, []), detections.get(image_id, [])
        matrix.update(
            xyxy(preds),
            [float(p["score"]) for p in preds],
            [label_of[int(p["category_id"])] for p in preds],
            xyxy(gts),
            [label_of[int(a["category_id"])] for a in gts],
            [bool(a.get("iscrowd", 0)) for a in gts],
        )
    return matrix
