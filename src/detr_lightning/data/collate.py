"""Batching detection samples of different image sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..ops.padding import pad_images

__all__ = ["collate_detection"]


def collate_detection(
    samples: Sequence[tuple[Tensor, dict[str, Any]]],
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Pad a list of ``(image, target)`` samples into one batch.

    Returns:
        images: [B, 3, H, W] float, zero-padded at the bottom/right to the largest H and W.
        padding_mask: [B, H, W] bool, True on padding pixels.
        targets: list of B dicts, unchanged (boxes stay normalized by each unpadded size).
    """
    images, padding_mask = pad_images([image for image, _ in samples])
    return images, padding_mask, [target for _, target in samples]
