"""Padding batches to their own size, to a step, or to a fixed set of canvases."""

from __future__ import annotations

import logging

import pytest
import torch

from detr_lightning.data.collate import collate_detection
from detr_lightning.ops.padding import canvas_size, pad_images, parse_pad_to


def _samples(*sizes: tuple[int, int]) -> list:
    return [(torch.ones(3, h, w), {"image_id": i}) for i, (h, w) in enumerate(sizes)]


def test_parse_pad_to_accepts_a_step_or_canvases_sorted_by_area():
    assert parse_pad_to(None) is None
    assert parse_pad_to(128) == 128
    assert parse_pad_to([[800, 1216], [608, 608], [1216, 800]]) == (
        (608, 608), (800, 1216), (1216, 800))  # fmt: skip
    for bad in (0, -32, True, [], [[800]], [[800, 0]], "128", [[1, 2, 3]]):
        with pytest.raises(ValueError, match=r"data\.pad_to"):
            parse_pad_to(bad)


def test_canvas_size_hand_computed():
    assert canvas_size(481, 640, None) == (481, 640)
    assert canvas_size(481, 640, 128) == (512, 640)
    assert canvas_size(512, 641, 128) == (512, 768)
    canvases = parse_pad_to([[640, 640], [512, 896], [896, 512], [800, 1344]])
    assert canvas_size(500, 600, canvases) == (640, 640)  # the smallest that holds it
    assert canvas_size(500, 700, canvases) == (512, 896)
    assert canvas_size(700, 700, canvases) == (800, 1344)
    assert canvas_size(900, 600, canvases) is None  # fits none


def test_collate_pads_to_the_canvas_and_masks_the_padding():
    canvases = parse_pad_to([[64, 64], [96, 128]])
    images, mask, targets = collate_detection(_samples((40, 50), (60, 30)), pad_to=canvases)
    assert images.shape == (2, 3, 64, 64) and mask.shape == (2, 64, 64)
    assert not mask[0, :40, :50].any() and mask[0, 40:].all() and mask[0, :, 50:].all()
    assert images[1, :, :60, :30].eq(1).all() and images[1, :, 60:].eq(0).all()
    assert [t["image_id"] for t in targets] == [0, 1]
    images, _, _ = collate_detection(_samples((70, 50)), pad_to=canvases)
    assert images.shape[-2:] == (96, 128)
    images, _, _ = collate_detection(_samples((70, 50), (33, 99)), pad_to=32)
    assert images.shape[-2:] == (96, 128)


def test_a_batch_that_fits_no_canvas_keeps_its_size_with_one_warning(caplog):
    canvases = parse_pad_to([[64, 64]])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            images, _, _ = collate_detection(_samples((70, 41)), pad_to=canvases)
            assert images.shape[-2:] == (70, 41)
    warnings = [r.getMessage() for r in caplog.records if "data.pad_to" in r.getMessage()]
    assert len(warnings) == 1 and "70x41" in warnings[0]


def test_pad_images_refuses_a_canvas_too_small():
    with pytest.raises(ValueError, match="does not fit"):
        pad_images([torch.ones(3, 10, 10)], size=(8, 16))
