"""COCO evaluation: one path for validation in ``fit``, ``trainer.test`` and ``eval.py``.

Detections are collected per image id on every rank, gathered on rank 0, de-duplicated and
scored with COCOeval against the annotation file itself. This makes the statistics exact in
ways a metric fed from the data loader cannot be:

- Lightning's ``DistributedSampler`` pads a split by repeating images so that every rank runs
  the same number of steps; a repeated image is counted once here, so N processes give the
  statistics (and the results file) of one process.
- Ground truth, crowd regions and areas come from the file, not from the loaded samples, so an
  image that fails to decode still counts its objects (as missed) and is reported.
- ``maxDets`` follows the number of queries when the model predicts more than 100 per image.

Rank 0 broadcasts the summary, so every rank logs identical values.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..ops.distributed import broadcast_object, gather_to_main, rank
from ..utils.io import write_json_atomic

log = logging.getLogger(__name__)

BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
# The 12 statistics of COCOeval.summarize(), in its order; "mar_{max_dets}" is AR at the last
# maxDets, which is 100 unless the model has more queries.
_STAT_ROWS = (
    ("map", "Average Precision", "AP", "0.50:0.95", "all", 2),
    ("map_50", "Average Precision", "AP", "0.50", "all", 2),
    ("map_75", "Average Precision", "AP", "0.75", "all", 2),
    ("map_small", "Average Precision", "AP", "0.50:0.95", "small", 2),
    ("map_medium", "Average Precision", "AP", "0.50:0.95", "medium", 2),
    ("map_large", "Average Precision", "AP", "0.50:0.95", "large", 2),
    ("mar_1", "Average Recall", "AR", "0.50:0.95", "all", 0),
    ("mar_10", "Average Recall", "AR", "0.50:0.95", "all", 1),
    ("mar_{}", "Average Recall", "AR", "0.50:0.95", "all", 2),
    ("mar_small", "Average Recall", "AR", "0.50:0.95", "small", 2),
    ("mar_medium", "Average Recall", "AR", "0.50:0.95", "medium", 2),
    ("mar_large", "Average Recall", "AR", "0.50:0.95", "large", 2),
)


def max_detections(num_queries: int) -> tuple[int, int, int]:
    """COCOeval's ``maxDets``: (1, 10, 100), the last raised to ``num_queries`` if larger."""
    return (1, 10, max(100, int(num_queries)))


def metric_keys(max_dets: int = 100) -> tuple[str, ...]:
    """Names of the 12 COCO statistics (torchmetrics' names; ``mar_100`` is ``mar_<max_dets>``)."""
    return tuple(row[0].format(max_dets) for row in _STAT_ROWS)


COCO_METRIC_KEYS = metric_keys(100)


def resolve_backend(backend: str) -> str:
    """``auto``: faster_coco_eval when it is installed (the same 12 statistics as pycocotools,
    computed in C++ several times faster), else pycocotools. Other names are returned as is."""
    if backend != "auto":
        return backend
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def coco_api(backend: str = "auto") -> tuple[type, type]:
    """The ``(COCO, COCOeval)`` classes of a backend (see :func:`resolve_backend`)."""
    backend = resolve_backend(backend)
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise ImportError(
                "eval_backend=faster_coco_eval needs the faster-coco-eval package: "
                "pip install 'detr-lightning[fast-eval]', or use eval_backend=pycocotools"
            ) from None
        return COCO, COCOeval_faster
    raise ValueError(f"eval_backend must be one of {BACKENDS}, got {backend!r}")


@dataclass
class EvaluationResult:
    """The outcome of one evaluation pass (identical on every rank)."""

    stats: dict[str, float]  # the 12 COCO statistics under metric_keys(max_dets)
    per_class: dict[int, float]  # AP@[.5:.95] per category id of the annotation file (-1: no GT)
    image_ids: list[int]  # the images scored, sorted (each once, whatever the ranks saw)
    skipped_images: list[int] = field(default_factory=list)  # image ids that did not decode
    max_dets: int = 100

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def metrics(self) -> dict[str, float]:
        """Flat scalars to log: the 12 statistics, per-class AP and the image counts."""
        values = dict(self.stats)
        values.update({f"ap_class/{cat}": ap for cat, ap in self.per_class.items()})
        values["num_images"] = float(self.num_images)
        values["skipped_images"] = float(len(self.skipped_images))
        return values


class CocoEvaluator:
    """Collects one pass of detections and scores them against a COCO annotation file.

    Args:
        annotation_file: the split's instances JSON (ground truth, read on rank 0 only).
        category_ids: dataset category id of each model label; -1 marks labels that stand for
            no category (their detections are dropped).
        max_dets: last COCOeval ``maxDets`` (see :func:`max_detections`).
        backend: "auto" (faster_coco_eval when installed), "pycocotools" or
            "faster_coco_eval" (the same statistics, faster).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        category_ids: Sequence[int],
        *,
        max_dets: int = 100,
        backend: str = "auto",
    ) -> None:
        self.backend = resolve_backend(backend)
        coco_api(self.backend)  # fail at set-up, not after the first epoch
        self.annotation_file = Path(annotation_file)
        self.category_ids = np.asarray(list(category_ids), dtype=np.int64)
        self.max_dets = int(max_dets)
        self.reset()

    def reset(self) -> None:
        # image id -> (boxes [N, 4] xywh float32, scores [N] float32, category ids [N] int64)
        self._detections: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._skipped: set[int] = set()

    def update(
        self, targets: Sequence[Mapping[str, Any]], detections: Sequence[Mapping[str, Tensor]]
    ) -> None:
        """Record a batch: ``detections[i]`` (xyxy pixels of the original image, ``scores``,
        contiguous ``labels``) belong to ``targets[i]["image_id"]``.

        A sample that stands in for an unreadable image (``targets[i]["stand_in_for"] >= 0``)
        records that image as skipped: it is evaluated with no detections.
        """
        for target, det in zip(targets, detections):
            stand_in_for = int(target.get("stand_in_for", -1))
            if stand_in_for >= 0:
                self._skipped.add(stand_in_for)
                continue
            image_id = int(target["image_id"])
            if image_id in self._detections:
                continue  # a repeat from the distributed sampler's padding
            boxes = det["boxes"].detach().float().cpu().numpy()
            categories = self.category_ids[det["labels"].detach().cpu().numpy()]
            keep = categories >= 0
            boxes = boxes[keep]
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            scores = det["scores"].detach().float().cpu().numpy()[keep]
            self._detections[image_id] = (xywh.astype(np.float32), scores, categories[keep])

    def compute(self, results_file: str | os.PathLike | None = None) -> EvaluationResult:
        """Gather all ranks, score on rank 0, optionally write the COCO results file there.

        Every rank must call this (it is a collective); all get the same result.
        """
        parts = gather_to_main((self._detections, self._skipped))
        result = None
        if rank() == 0:
            assert parts is not None
            detections: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            skipped: set[int] = set()
            for part_detections, part_skipped in parts:
                for image_id, value in part_detections.items():
                    detections.setdefault(image_id, value)
                skipped |= part_skipped
            skipped -= set(detections)  # read elsewhere (e.g. a repeat): it was evaluated
            results = results_list(detections)
            if results_file is not None:
                write_json_atomic(results_file, results)
            result = self._score(results, sorted(set(detections) | skipped), sorted(skipped))
        return broadcast_object(result)

    def _score(
        self, results: list[dict[str, Any]], image_ids: list[int], skipped: list[int]
    ) -> EvaluationResult:
        if skipped:
            log.warning(
                "%d image(s) of %s did not decode and were evaluated as having no detections "
                "(their objects count as missed): image ids %s%s",
                len(skipped),
                self.annotation_file,
                skipped[:10],
                " ..." if len(skipped) > 10 else "",
            )
        COCO, COCOeval = coco_api(self.backend)
        with _quiet_backend():
            ground_truth = COCO(str(self.annotation_file))
            evaluator = COCOeval(ground_truth, _load_results(ground_truth, results), "bbox")
            evaluator.params.imgIds = image_ids
            evaluator.params.maxDets = list(max_detections(self.max_dets))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        keys = metric_keys(evaluator.params.maxDets[-1])
        stats = {key: float(value) for key, value in zip(keys, evaluator.stats)}
        return EvaluationResult(
            stats=stats,
            per_class=_per_class_ap(evaluator),
            image_ids=image_ids,
            skipped_images=skipped,
            max_dets=evaluator.params.maxDets[-1],
        )


def results_list(
    detections: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> list[dict[str, Any]]:
    """COCO results format (image id, category id, absolute xywh, score), by image id."""
    results = []
    for image_id in sorted(detections):
        boxes, scores, categories = detections[image_id]
        for box, score, category in zip(boxes.tolist(), scores.tolist(), categories.tolist()):
            results.append(
                {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            )
    return results


def _load_results(ground_truth: Any, results: list[dict[str, Any]]) -> Any:
    """``ground_truth.loadRes(results)``, also for an empty list (which loadRes rejects)."""
    if results:
        return ground_truth.loadRes(results)
    empty = type(ground_truth)()
    empty.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "categories": list(ground_truth.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _per_class_ap(evaluator: Any) -> dict[int, float]:
    """AP@[.5:.95] (area all, last maxDets) per category; -1 where the category has no GT."""
    precision = np.asarray(evaluator.eval["precision"])  # [T, R, K, A, M]
    per_class = {}
    for k, category in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[int(category)] = float(values.mean()) if values.size else -1.0
    return per_class


@contextlib.contextmanager
def _quiet_backend():
    """Silence the COCO backends, whose table the caller reports itself: pycocotools prints
    to stdout, faster_coco_eval logs at INFO (shown wherever the root logger is at INFO, as in
    train.py and eval.py)."""
    logger = logging.getLogger("faster_coco_eval")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def coco_eval_file(annotation_file: str | os.PathLike, results_file: str | os.PathLike) -> list:
    """pycocotools' 12 statistics for a results file, nothing else (a cross-check)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        results = json.loads(Path(results_file).read_text())
        evaluator = COCOeval(ground_truth, _load_results(ground_truth, results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


__all__ = [
    "COCO_METRIC_KEYS",
    "CocoEvaluator",
    "EvaluationResult",
    "coco_api",
    "coco_eval_file",
    "max_detections",
    "metric_keys",
    "resolve_backend",
]
