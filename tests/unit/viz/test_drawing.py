"""Detections drawn on their image."""

from __future__ import annotations

import torch

from detr_lightning.viz.drawing import PALETTE, draw_detections, drawing_scale


def test_draw_gives_each_class_its_colour():
    pixels = torch.zeros(3, 100, 100, dtype=torch.uint8)
    detection = {
        "boxes": torch.tensor([[10.0, 10, 40, 40], [50, 50, 90, 90]]),
        "labels": torch.tensor([2, 2]),
        "names": ["dog", "dog"],
        "scores": torch.tensor([0.9, 0.8]),
    }
    drawn = draw_detections(pixels, detection)
    scale = drawing_scale(100, 100)  # a small image is drawn enlarged, captions legible
    assert scale == 5 and drawn.shape == (3, 500, 500)
    for x, y in ((10, 35), (50, 85)):  # left edges, below the captions
        assert tuple(drawn[:, y * scale, x * scale].tolist()) == PALETTE[2]
    large = torch.zeros(3, 600, 500, dtype=torch.uint8)
    assert draw_detections(large, detection).shape == large.shape  # large enough as it is
