"""Batching detection samples of different image sizes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..ops.padding import PadTo, canvas_size, pad_images

__all__ = ["collate_detection"]

log = logging.getLogger(__name__)
_warned_sizes: set[tuple[int, int]] = set()


def collate_detection(
    samples: Sequence[tuple[Tensor, dict[str, Any]]], pad_to: PadTo = None
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Pad a list of ``(image, target)`` samples into one batch.

    ``pad_to`` (:func:`~detr_lightning.ops.padding.parse_pad_to`): None pads to the largest
    height and width of the batch; a step rounds them up to its multiples; a list of canvas
    sizes takes the smallest that holds the batch, so that an epoch has only those shapes
    (what a captured graph or a compiled kernel per shape needs). A batch that fits no canvas
    is padded to its own size, with a warning (once per size).

    Returns:
        images: [B, 3, H, W] float, zero-padded at the bottom/right.
        padding_mask: [B, H, W] bool, True on padding pixels.
        targets: list of B dicts, unchanged (boxes stay normalized by each unpadded size),
            except that ``masks`` [N, h, w] (segmentation) are padded to [N, H, W].
    """
    pictures = [image for image, _ in samples]
    height = max(int(image.shape[-2]) for image in pictures)
    width = max(int(image.shape[-1]) for image in pictures)
    size = canvas_size(height, width, pad_to)
    if size is None and (height, width) not in _warned_sizes:
        _warned_sizes.add((height, width))
        log.warning(
            "a batch of %dx%d images fits none of the canvas sizes of data.pad_to %s; it is "
            "padded to its own size, a shape of its own (add a canvas that holds it, or lower "
            "data.max_size)",
            height, width, [list(canvas) for canvas in pad_to],
        )  # fmt: skip
    images, padding_mask = pad_images(pictures, size=size)
    targets = [target for _, target in samples]
    if targets and "masks" in targets[0]:
        canvas = images.shape[-2:]
        targets = [_pad_masks(target, canvas) for target in targets]
    return images, padding_mask, targets


def _pad_masks(target: dict[str, Any], canvas: Sequence[int]) -> dict[str, Any]:
    """The target with its ``masks`` [N, h, w] padded (False) bottom/right to the canvas, as
    its image: the mask loss compares them with predictions of the whole padded batch."""
    masks = target["masks"]
    pad = (0, int(canvas[1]) - masks.shape[-1], 0, int(canvas[0]) - masks.shape[-2])
    return {**target, "masks": F.pad(masks, pad) if any(pad) else masks}
