"""Box helpers, thin over ``torchvision.ops``.

Formats: ``cxcywh`` = (center x, center y, width, height), ``xyxy`` = (x0, y0, x1, y1). DETR
predicts cxcywh normalized to [0, 1] by each image's unpadded size.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

__all__ = [
    "batched_generalized_box_iou",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "mask_boxes",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    return box_convert(boxes, "xyxy", "cxcywh")


def batched_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU for batches of xyxy boxes.

    ``torchvision.ops.generalized_box_iou`` is 2-D only; the matcher needs one [Q, T] matrix per
    image and decoder layer at once, so this broadcasts over leading dimensions.

    Args:
        boxes1: [..., N, 4] xyxy.
        boxes2: [..., M, 4] xyxy (leading dimensions broadcast against ``boxes1``'s).
    Returns:
        [..., N, M] generalized IoU in [-1, 1].
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    b1 = boxes1.unsqueeze(-2)  # [..., N, 1, 4]
    b2 = boxes2.unsqueeze(-3)  # [..., 1, M, 4]
    inter_wh = (b1[..., 2:].minimum(b2[..., 2:]) - b1[..., :2].maximum(b2[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1.unsqueeze(-1) + area2.unsqueeze(-2) - inter
    hull_wh = (b1[..., 2:].maximum(b2[..., 2:]) - b1[..., :2].minimum(b2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union - (hull - union) / hull


def mask_boxes(masks: Tensor) -> Tensor:
    """[n, H, W] bool -> [n, 4] float32 XYXY boxes of the pixels, at pixel edges (the last
    row / column + 1); an empty mask gives [0, 0, 0, 0]."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(2).float(), masks.any(1).float()  # [n, H], [n, W]
    height, width = masks.shape[-2:]
    left, top = cols.argmax(1), rows.argmax(1)  # the first True
    right, bottom = width - cols.flip(1).argmax(1), height - rows.flip(1).argmax(1)
    empty = ~masks.flatten(1).any(1)
    boxes = torch.stack([left, top, right, bottom], 1).float()
    return boxes.masked_fill(empty[:, None], 0.0)
