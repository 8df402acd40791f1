"""Batching images of different sizes: pad bottom/right and keep a padding mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor], size_divisibility: int = 0) -> tuple[Tensor, Tensor]:
    """Stack [C,H_i,W_i] images into one zero-padded batch.

    Images keep their top-left corner; padding goes to the bottom and right, as in the
    official DETR code, so normalized box coordinates of each image stay valid.

    Returns:
        images: [B, C, H, W] with H, W the largest height and width in the list (rounded up to
            a multiple of ``size_divisibility`` when it is > 0).
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
    if size_divisibility > 0:
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
