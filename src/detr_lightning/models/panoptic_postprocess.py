"""DETR's panoptic post-processing: confident queries' masks -> one segment id per pixel.

The official algorithm (its ``PostProcessPanoptic``), step by step: keep the queries whose
most likely class is not "no object" and whose softmax score exceeds ``threshold`` (0.85);
upsample their mask logits (bilinear) to the image size; give each pixel the query of the
largest mask logit (an argmax over the queries' per-pixel softmax); give every kept query of
one stuff class the id of the first of them; resize the id map (nearest) to the output size;
then, while some kept query covers ``min_area`` (4) pixels or fewer, drop those and assign
the pixels again (without the stuff merge: the merged queries have no pixels left, so they
go at the first drop). Segments are numbered 0, 1, ... in query order. An image without a
kept query gets a map of zeros and no segments (all of it VOID for the PQ computation).

One change makes it correct at any batch size: the masks are predicted on the padded batch,
so each image's own region (``ceil(h / 4) x ceil(w / 4)`` at stride 4, what the image alone
gives) is cropped before upsampling. The official code upsamples the whole padded map to the
image size, which stretches the masks of every image smaller than its batch; on a batch of
one both are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_STRIDE = 4  # pred_masks are at the stride of the backbone's first stage


@dataclass
class PanopticSegmentation:
    """One image's panoptic result.

    ``segment_map`` [H, W] int64: a segment id per pixel (the index into ``segments_info``);
    ``segments_info``: per segment ``id``, ``category_id`` (the model's class index),
    ``isthing`` and ``area`` (pixels in the map), as the COCO panoptic results format wants
    them; ``scores``: the kept queries' scores, in segment order.
    """

    segment_map: Tensor
    segments_info: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def postprocess_panoptic(
    outputs: Mapping[str, Tensor],
    image_sizes: Tensor | Sequence[Sequence[int]],
    target_sizes: Tensor | Sequence[Sequence[int]] | None = None,
    *,
    is_thing: Sequence[bool] | Mapping[int, bool],
    threshold: float = 0.85,
    min_area: int = 4,
) -> list[PanopticSegmentation]:
    """Panoptic segmentation of each image of a batch.

    Args:
        outputs: the panoptic model's ``pred_logits`` [B, Q, C+1], ``pred_masks``
            [B, Q, h, w] (stride 4 of the padded batch).
        image_sizes: [B, 2] (height, width) of each image as the model saw it, unpadded.
        target_sizes: [B, 2] size of the output maps (e.g. the original image sizes);
            default ``image_sizes``.
        is_thing: per class index, whether it is a thing (True) or stuff (False).
        threshold: the score a query needs (strictly more than), 0.85 officially.
        min_area: segments of this many pixels or fewer are dropped, 4 officially.
    """
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if target_sizes is None:
        target_sizes = image_sizes
    sizes = [tuple(int(v) for v in size) for size in _rows(image_sizes)]
    targets = [tuple(int(v) for v in size) for size in _rows(target_sizes)]
    if not len(sizes) == len(targets) == logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} images in the outputs, {len(sizes)} image_sizes and "
            f"{len(targets)} target_sizes"
        )
    no_object = logits.shape[-1] - 1
    results = []
    for image_logits, image_masks, size, target in zip(logits, masks, sizes, targets):
        scores, labels = image_logits.float().softmax(-1).max(-1)
        keep = (labels != no_object) & (scores > threshold)
        crop = (math.ceil(size[0] / MASK_STRIDE), math.ceil(size[1] / MASK_STRIDE))
        if crop[0] > image_masks.shape[-2] or crop[1] > image_masks.shape[-1]:
            raise ValueError(
                f"image size {size} needs masks of at least {crop}; pred_masks are "
                f"{tuple(image_masks.shape[-2:])}: pass the sizes the model saw"
            )
        kept = image_masks[keep][:, : crop[0], : crop[1]].float()
        kept = F.interpolate(kept[:, None], size=size, mode="bilinear", align_corners=False)
        results.append(
            _segments(kept[:, 0], scores[keep], labels[keep], target, is_thing, min_area)
        )
    return results


def _rows(sizes: Tensor | Sequence[Sequence[int]]) -> list:
    return sizes.tolist() if isinstance(sizes, Tensor) else list(sizes)


def _segments(
    masks: Tensor,
    scores: Tensor,
    labels: Tensor,
    target: tuple[int, int],
    is_thing: Sequence[bool] | Mapping[int, bool],
    min_area: int,
) -> PanopticSegmentation:
    """The official assignment of pixels to the kept queries (masks [K, h, w] logits)."""
    label_list = labels.tolist()
    first_of_class: dict[int, int] = {}
    merge = []  # (query, the first query of its stuff class)
    for index, label in enumerate(label_list):
        if not is_thing[label]:
            if label in first_of_class:
                merge.append((index, first_of_class[label]))
            else:
                first_of_class[label] = index

    def assign(current: Tensor, merged: bool) -> tuple[Tensor, list[int]]:
        height, width = current.shape[-2:]
        if current.shape[0] == 0:
            ids = torch.zeros(height, width, dtype=torch.long, device=current.device)
        else:
            ids = current.flatten(1).transpose(0, 1).softmax(-1).argmax(-1).view(height, width)
        if merged:
            for index, first in merge:
                ids = ids.masked_fill(ids == index, first)
        # nearest resize as PIL's (what the official code runs): source pixel of output
        # pixel x is floor((x + 0.5) * in / out), torch's "nearest-exact"
        ids = F.interpolate(ids[None, None].float(), size=target, mode="nearest-exact")
        ids = ids[0, 0].long()
        areas = torch.bincount(ids.flatten(), minlength=current.shape[0])[: current.shape[0]]
        return ids, areas.tolist()

    ids, areas = assign(masks, merged=True)
    kept = list(range(len(label_list)))
    while kept:
        small = [area <= min_area for area in areas]
        if not any(small):
            break
        kept = [index for index, drop in zip(kept, small) if not drop]
        ids, areas = assign(masks[kept], merged=False)
    segments = [
        {"id": i, "isthing": bool(is_thing[label_list[q]]), "category_id": label_list[q],
         "area": int(area)}
        for i, (q, area) in enumerate(zip(kept, areas))
    ]  # fmt: skip
    return PanopticSegmentation(ids, segments, [float(scores[q]) for q in kept])
