"""What the export tests share: the batches they compare on and the comparison itself."""

from __future__ import annotations

import torch

from detr_lightning.lightning import DETRModule
from detr_lightning.ops.padding import pad_images

BOX_ATOL, LOGIT_ATOL = 1e-4, 1e-3


# Image sizes per batch, padded bottom/right to the first (largest) one: batch 1, 2 and 4 at
# 96x128 and 160x112. In "b2-160x112" the 56-wide image in a 112-wide batch is a size where
# an ONNX Resize of the mask would move the padding boundary (see ExactMaskBackbone), and so
# is "b2-120x128" (60 of 120 rows).
CASES = {
    "b1-96x128": [(96, 128)],
    "b1-160x112": [(160, 112)],
    "b2-96x128": [(96, 128), (64, 100)],
    "b2-160x112": [(160, 112), (120, 56)],
    "b2-120x128": [(120, 128), (60, 96)],
    "b4-96x128": [(96, 128), (64, 100), (80, 128), (96, 72)],
    "b4-160x112": [(160, 112), (120, 56), (100, 112), (160, 80)],
}


def batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return pad_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])


def reference(module: DETRModule, images, padding_mask) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = module(images, padding_mask)
    return out["pred_logits"], out["pred_boxes"]


def assert_parity(logits, boxes, ref_logits, ref_boxes) -> None:
    assert logits.shape == ref_logits.shape and boxes.shape == ref_boxes.shape
    torch.testing.assert_close(boxes, ref_boxes, atol=BOX_ATOL, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
