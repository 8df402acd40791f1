"""Batching images of different sizes: pad bottom/right and keep a padding mask, to the
batch's own size or to a fixed set of canvas sizes (``data.pad_to``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# None (each batch its own size), a step in pixels, or canvas sizes (height, width)
PadTo = int | tuple[tuple[int, int], ...] | None


def parse_pad_to(value: Any, key: str = "data.pad_to") -> PadTo:
    """``data.pad_to`` as :func:`canvas_size` takes it: None; a step (a positive int: height
    and width rounded up to its multiples); or a list of [height, width] canvas sizes (each
    batch goes on the smallest one it fits), sorted by area. Raises ValueError naming ``key``
    for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: give null, a step in pixels, or [[H, W], ...]")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{key}={value}: a step of at least 1 pixel (or null)")
        return value
    try:
        canvases = tuple((int(size[0]), int(size[1])) for size in value if len(size) == 2)
        complete = len(canvases) == len(value) > 0
    except (TypeError, ValueError, IndexError):
        complete = False
    if not complete or min(min(canvas) for canvas in canvases) < 1:
        raise ValueError(
            f"{key}={value!r}: give null, a step in pixels (e.g. 128), or a list of canvas "
            "sizes [[height, width], ...] (e.g. [[800, 1216], [1216, 800]])"
        )
    return tuple(sorted(set(canvases), key=lambda canvas: (canvas[0] * canvas[1], canvas)))


def canvas_size(height: int, width: int, pad_to: PadTo) -> tuple[int, int] | None:
    """The padded size of a batch whose largest image is ``height`` x ``width``: itself
    (``pad_to`` None), rounded up to multiples of a step, or the smallest canvas of a list
    that holds it (None when none does)."""
    if pad_to is None:
        return height, width
    if isinstance(pad_to, int):
        return -(-height // pad_to) * pad_to, -(-width // pad_to) * pad_to
    for canvas_height, canvas_width in pad_to:
        if height <= canvas_height and width <= canvas_width:
            return canvas_height, canvas_width
    return None


def pad_images(
    images: Sequence[Tensor], size_divisibility: int = 0, size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Stack [C,H_i,W_i] images into one zero-padded batch.

    Images keep their top-left corner; padding goes to the bottom and right, as in the
    official DETR code, so normalized box coordinates of each image stay valid.

    Returns:
        images: [B, C, H, W] with H, W the largest height and width in the list (rounded up to
            a multiple of ``size_divisibility`` when it is > 0), or ``size`` when given (it
            must hold every image).
        padding_mask: [B, H, W] bool, True on padding pixels.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image, got an empty list")
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"image {i} has shape {tuple(image.shape)}; expected [C, H, W]")
    channels = images[0].shape[0]
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    if size is not None:
        if size[0] < height or size[1] < width:
            raise ValueError(f"a {height}x{width} image does not fit a {size[0]}x{size[1]} canvas")
        height, width = int(size[0]), int(size[1])
    elif size_divisibility > 0:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), channels, height, width))
    padding_mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, image in enumerate(images):
        if image.shape[0] != channels:
            raise ValueError(
                f"image {i} has {image.shape[0]} channels, image 0 has {channels}; "
                "all images of a batch need the same number of channels"
            )
        h, w = image.shape[1:]
        batch[i, :, :h, :w].copy_(image)
        padding_mask[i, :h, :w] = False
    return batch, padding_mask


def target_slots(sizes: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image items (of ``sizes``, concatenated) padded to ``length`` slots each, on the
    host: ``gather`` [B, length] int64, the index into the concatenation of each slot (a
    padded slot repeats item 0), and ``inside`` [B, length] bool, True on real items."""
    starts = np.cumsum([0, *sizes[:-1]])
    slots = np.arange(length)
    inside = slots < np.asarray(sizes, dtype=np.int64)[:, None]
    return np.where(inside, starts[:, None] + slots, 0).astype(np.int64), inside
