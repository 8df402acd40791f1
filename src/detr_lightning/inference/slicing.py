"""Sliced inference for small objects in large images: the model runs on overlapping tiles
(and on the whole image), and the detections of all passes are merged.

Every tile goes through the model's evaluation preprocessing as an image of the tile's size
would: with the paper's settings a 640-pixel tile is enlarged to 800 (x1.25) while a
4000x3000 photo as a whole shrinks to 1067x800 (x0.27), so a small object gets about 4.7
times more pixels a side in a tile. A tile of the model's ``val_size`` runs at the image's
native resolution. Tiles of one size share forward passes (``batch_size``); the whole-image
pass keeps the objects that are larger than the overlap, which tile borders cut.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from ..data.images import read_image
from .predictor import ImageSource, Predictor

__all__ = [
    "MERGE_METHODS",
    "SliceSettings",
    "merge_detections",
    "predict_sliced",
    "tile_origins",
    "tile_windows",
    "touches_inner_border",
    "weighted_box_fusion",
]

MERGE_METHODS = ("nms", "wbf")
MIN_TILE = 32  # DETR's backbone downsamples by 32: a smaller tile has no feature map to speak of


@dataclass(frozen=True)
class SliceSettings:
    """How :func:`predict_sliced` tiles an image and merges the detections.

    ``size``: the tile side in pixels, or (height, width); ``overlap``: the fraction of a tile
    that neighbouring tiles share, in [0, 1); ``whole_image``: also run the whole image;
    ``merge``: ``"nms"`` (class-wise non-maximum suppression) or ``"wbf"`` (weighted box
    fusion); ``iou_threshold``: boxes of one class overlapping more than this are merged;
    ``drop_partial``: drop tile detections that reach an inner tile border (within
    ``partial_margin`` pixels of the image), objects that the tile cuts.
    """

    size: int | tuple[int, int] = 640
    overlap: float = 0.2
    whole_image: bool = True
    merge: str = "nms"
    iou_threshold: float = 0.5
    drop_partial: bool = True
    partial_margin: float = 4.0

    def __post_init__(self) -> None:
        size = self.size
        sides = list(size) if isinstance(size, (list, tuple)) else [size]
        if len(sides) not in (1, 2) or not all(_is_int(s) and s >= MIN_TILE for s in sides):
            raise ValueError(
                f"size={size!r}: give the tile side in pixels, at least {MIN_TILE} (e.g. 640), "
                "or [height, width]"
            )
        object.__setattr__(self, "size", int(sides[0]) if len(sides) == 1 else tuple(sides))
        if not _is_number(self.overlap) or not 0.0 <= self.overlap < 1.0:
            raise ValueError(
                f"overlap={self.overlap!r}: the fraction of a tile that neighbours share must "
                "lie in [0, 1), e.g. 0.2"
            )
        for key in ("whole_image", "drop_partial"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r}: true or false")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"merge={self.merge!r}: choose one of {', '.join(MERGE_METHODS)}")
        if not _is_number(self.iou_threshold) or not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold={self.iou_threshold!r}: an IoU in [0, 1], e.g. 0.5")
        if not _is_number(self.partial_margin) or self.partial_margin < 0:
            raise ValueError(f"partial_margin={self.partial_margin!r}: pixels >= 0, e.g. 4")

    @property
    def tile_size(self) -> tuple[int, int]:
        """(height, width) of a tile in pixels."""
        return (self.size, self.size) if isinstance(self.size, int) else self.size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------- tiles
def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """First pixel of each tile along an axis of ``length`` pixels, in increasing order.

    Tiles of ``min(tile, length)`` pixels step by that size less ``round(overlap * size)``
    (at most size - 1) from 0; the last one is shifted to end at ``length``, so none runs
    off the image (an axis shorter than a tile is one tile).
    """
    tile = min(tile, length)
    stride = tile - min(round(overlap * tile), tile - 1)
    return [*range(0, length - tile, stride), length - tile]


def tile_windows(
    height: int, width: int, size: int | tuple[int, int], overlap: float
) -> list[tuple[int, int, int, int]]:
    """The tiles of a ``height`` x ``width`` image: (x0, y0, x1, y1) in pixels (x1, y1
    exclusive), row by row; ``size`` a side or (height, width) (see :func:`tile_origins`)."""
    tile_h, tile_w = (size, size) if isinstance(size, int) else size
    rows = tile_origins(height, tile_h, overlap)
    columns = tile_origins(width, tile_w, overlap)
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    return [(x0, y0, x0 + tile_w, y0 + tile_h) for y0 in rows for x0 in columns]


def touches_inner_border(
    boxes: Tensor, window: tuple[int, int, int, int], size: tuple[int, int], margin: float
) -> Tensor:
    """bool [N]: which ``boxes`` (xyxy image pixels, [N, 4]) come within ``margin`` pixels of
    (or cross) an edge of the tile ``window`` that lies inside the image of ``size`` (height,
    width); edges on the image border never count."""
    x0, y0, x1, y1 = window
    height, width = size
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + margin
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + margin
    if x1 < width:
        cut |= boxes[:, 2] >= x1 - margin
    if y1 < height:
        cut |= boxes[:, 3] >= y1 - margin
    return cut


# ------------------------------------------------------------------------------- merge
def weighted_box_fusion(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse the overlapping boxes of each class into their score-weighted mean.

    ``boxes`` [N, 4] xyxy, ``scores`` [N], ``labels`` [N]. In order of score, a box joins the
    cluster of its class whose fused box it overlaps most, when that IoU exceeds
    ``iou_threshold``, and the cluster's box becomes the weighted mean of its members;
    otherwise it starts a cluster. Unlike the paper's multi-model WBF, a cluster scores as its
    best member (not the mean, rescaled by the number of models): a small object is seen by
    one or two of the passes, not by all. Returns the fused boxes [M, 4], their scores [M] and
    the index of each cluster's best box [M], sorted by score (descending).
    """
    count = len(boxes)
    weighted_sum = torch.zeros(count, 4, dtype=torch.float64)
    weight = torch.zeros(count, dtype=torch.float64)
    fused = torch.zeros(count, 4, dtype=boxes.dtype)
    cluster_labels = torch.zeros(count, dtype=labels.dtype)
    best = torch.zeros(count, dtype=torch.int64)
    clusters = 0
    for index in scores.argsort(descending=True, stable=True).tolist():
        box, label = boxes[index], labels[index]
        box_weight = max(float(scores[index]), 1e-12)  # a zero score still counts a little
        target = clusters
        if clusters:
            overlaps = box_iou(box[None], fused[:clusters])[0]
            overlaps[cluster_labels[:clusters] != label] = -1.0
            nearest = int(overlaps.argmax())
            if overlaps[nearest] > iou_threshold:
                target = nearest
        if target == clusters:
            cluster_labels[target], best[target] = label, index
            clusters += 1
        weighted_sum[target] += box_weight * box.to(torch.float64)
        weight[target] += box_weight
        fused[target] = (weighted_sum[target] / weight[target]).to(boxes.dtype)
    best = best[:clusters]
    return fused[:clusters], scores[best], best


def merge_detections(
    detection: dict[str, Any], method: str = "nms", iou_threshold: float = 0.5
) -> dict[str, Any]:
    """Detections of overlapping passes merged class by class (a :meth:`Predictor.predict`
    dict in, the same out, sorted by score).

    ``"nms"``: of boxes of one label whose IoU exceeds ``iou_threshold`` only the best stays
    (torchvision's ``batched_nms``); ``"wbf"``: :func:`weighted_box_fusion`, each merged
    detection keeping the label, name and query of its best box.
    """
    boxes, scores, labels = detection["boxes"], detection["scores"], detection["labels"]
    if method == "nms":
        keep = batched_nms(boxes, scores, labels, iou_threshold)
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
        return _take(detection, keep)
    if method == "wbf":
        fused, fused_scores, keep = weighted_box_fusion(boxes, scores, labels, iou_threshold)
        return {**_take(detection, keep), "boxes": fused, "scores": fused_scores}
    raise ValueError(f"merge={method!r}: choose one of {', '.join(MERGE_METHODS)}")


def _take(detection: dict[str, Any], index: Tensor) -> dict[str, Any]:
    """The detections at ``index`` (the names list too)."""
    taken = {key: value[index] for key, value in detection.items() if key != "names"}
    taken["names"] = [detection["names"][i] for i in index.tolist()]
    return taken


def _concatenate(detections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    joined = {
        key: torch.cat([d[key] for d in detections]) for key in detections[0] if key != "names"
    }
    joined["names"] = [name for d in detections for name in d["names"]]
    return joined


# ------------------------------------------------------------------------------ predict
def predict_sliced(
    predictor: Predictor,
    images: ImageSource | Sequence[ImageSource],
    slicing: SliceSettings | None = None,
    *,
    threshold: float = 0.7,
    top_k: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bf16: bool = False,
) -> list[dict[str, Any]]:
    """Detect objects in the tiles of each image (and the whole image), merged.

    Takes the images and arguments of :meth:`Predictor.predict` and returns the same list of
    dicts (boxes xyxy in original image pixels). Each image is cut into the tiles of
    :func:`tile_windows`; every pass selects its detections above ``threshold``, tile boxes
    move to image coordinates (with ``drop_partial``, those at an inner tile border are
    dropped), and all are merged by :func:`merge_detections`; ``top_k`` applies to the merged
    result. An image no larger than a tile runs once, as :meth:`Predictor.predict` runs it.
    ``batch_size`` tiles share a forward pass. ``slicing`` None: :class:`SliceSettings`'
    defaults.
    """
    slicing = slicing or SliceSettings()
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of detections or None, got {top_k}")
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    elif isinstance(images, Tensor):
        images = list(images) if images.dim() == 4 else [images]
    options = {"threshold": threshold, "batch_size": batch_size, "device": device, "bf16": bf16}
    results = []
    for image in images:
        detection = _predict_one(predictor, read_image(image), slicing, options)
        if top_k is not None:
            detection = _take(detection, torch.arange(min(top_k, len(detection["scores"]))))
        results.append(detection)
    return results


def _predict_one(
    predictor: Predictor, pixels: Tensor, slicing: SliceSettings, options: dict[str, Any]
) -> dict[str, Any]:
    """One image's merged detections (uint8 [3, H, W] in), before ``top_k``."""
    size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    windows = tile_windows(*size, slicing.tile_size, slicing.overlap)
    if windows == [(0, 0, size[1], size[0])]:
        windows = []  # the one tile is the whole image: a single pass
    passes: list[tuple[int, int, int, int] | None] = list(windows)
    if slicing.whole_image or not windows:
        passes.insert(0, None)  # None: the whole image
    sources = (pixels if w is None else pixels[:, w[1] : w[3], w[0] : w[2]] for w in passes)
    found: dict[int, dict[str, Any]] = {}
    for item, detection in predictor.iter_predictions(sources, top_k=None, **options):
        window = passes[item.index]
        if window is not None:
            x0, y0 = window[:2]
            boxes = detection["boxes"] + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            detection = {**detection, "boxes": boxes}
            if slicing.drop_partial:
                cut = touches_inner_border(boxes, window, size, slicing.partial_margin)
                detection = _take(detection, (~cut).nonzero().flatten())
        found[item.index] = detection
    merged = _concatenate([found[i] for i in range(len(passes))])
    if len(passes) == 1:
        return merged  # nothing overlaps: the pass as it is (sorted by score)
    return merge_detections(merged, slicing.merge, slicing.iou_threshold)
