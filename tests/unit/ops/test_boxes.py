"""Box helpers: format conversion and batched GIoU against torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou as tv_generalized_box_iou

from detr_lightning.ops.boxes import (
    batched_generalized_box_iou,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
)


def random_xyxy(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Valid xyxy boxes (x1 > x0, y1 > y0) of shape [*shape, 4]."""
    top_left = torch.rand(*shape, 2, generator=generator)
    size = torch.rand(*shape, 2, generator=generator) * 0.5 + 0.01
    return torch.cat([top_left, top_left + size], dim=-1)


def test_cxcywh_to_xyxy_hand_computed() -> None:
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.6], [10.0, 20.0, 4.0, 8.0]])
    expected = torch.tensor([[0.4, 0.1, 0.6, 0.7], [8.0, 16.0, 12.0, 24.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), expected)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected), boxes)


def test_round_trip_keeps_leading_dimensions() -> None:
    generator = torch.Generator().manual_seed(0)
    xyxy = random_xyxy(3, 5, 7, generator=generator)
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    assert cxcywh.shape == (3, 5, 7, 4)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)


def test_batched_giou_matches_torchvision_per_batch_element() -> None:
    generator = torch.Generator().manual_seed(1)
    boxes1 = random_xyxy(4, 6, generator=generator)
    boxes2 = random_xyxy(4, 3, generator=generator)
    giou = batched_generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (4, 6, 3)
    for i in range(4):
        torch.testing.assert_close(giou[i], tv_generalized_box_iou(boxes1[i], boxes2[i]))


def test_batched_giou_broadcasts_leading_dimensions() -> None:
    # The matcher's use: predictions [L, B, Q, 4] against targets [1, B, T, 4].
    generator = torch.Generator().manual_seed(2)
    predictions = random_xyxy(3, 2, 5, generator=generator)
    targets = random_xyxy(2, 4, generator=generator)
    giou = batched_generalized_box_iou(predictions, targets[None])
    assert giou.shape == (3, 2, 5, 4)
    for layer in range(3):
        for image in range(2):
            expected = tv_generalized_box_iou(predictions[layer, image], targets[image])
            torch.testing.assert_close(giou[layer, image], expected)


@pytest.mark.parametrize(
    ("box1", "box2", "expected"),
    [
        ((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0), 1.0),  # identical
        ((0.0, 0.0, 1.0, 1.0), (2.0, 0.0, 3.0, 1.0), -1.0 / 3.0),  # union 2, hull 3
        ((0.0, 0.0, 2.0, 2.0), (1.0, 1.0, 3.0, 3.0), 1.0 / 7.0 - 2.0 / 9.0),  # inter 1, union 7
    ],
)
def test_batched_giou_hand_computed(box1, box2, expected) -> None:
    giou = batched_generalized_box_iou(torch.tensor([[box1]]), torch.tensor([[box2]]))
    assert giou.shape == (1, 1, 1)
    assert giou.item() == pytest.approx(expected, abs=1e-6)


def test_mask_boxes_hand_computed():
    from detr_lightning.ops.boxes import mask_boxes

    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    masks[1, 4, 0] = True  # one pixel in the corner
    boxes = mask_boxes(masks)  # the third is empty
    assert boxes.tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    assert mask_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)
