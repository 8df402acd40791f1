"""Training samples drawn in one grid image: each image as the model receives it, turned back
into RGB, with its target boxes, class names and a caption; optionally beside its original.

Layout (all sizes in pixels): cells of ``tile_size`` x ``tile_size`` panels (two side by side,
:data:`PANEL_GAP` apart, with originals) above a caption strip of :func:`caption_height`, in
rows of ``columns`` cells, with :data:`GRID_MARGIN` around and between the cells
(:func:`grid_size`). Each image is scaled so that its long side fills the
panel, and centred in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from ..data.presets import IMAGENET_MEAN, IMAGENET_STD
from .drawing import caption_font, draw_boxes

__all__ = [
    "BACKGROUND",
    "GRID_MARGIN",
    "PANEL_GAP",
    "augmentation_grid",
    "caption_height",
    "denormalize",
    "draw_tile",
    "grid_size",
    "pixel_boxes",
    "save_png",
]

GRID_MARGIN = 16  # px around and between the cells
PANEL_GAP = 4  # px between an original and its sample
BACKGROUND = (40, 40, 40)  # the grid's colour, also where an image does not fill its panel
CAPTION_COLOR = (235, 235, 235)
UNNORMALIZED = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std of images in [0, 1]


def denormalize(
    image: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """float [3, H, W] normalized as ``(x / 255 - mean) / std`` -> uint8 RGB [3, H, W].

    The inverse of the training normalization (rounded, clipped to [0, 255]); ``mean`` 0 and
    ``std`` 1 (:data:`UNNORMALIZED`) turn an image in [0, 1] into uint8."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {tuple(image.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.to(torch.float32) * std_t + mean_t) * 255.0
    return rgb.round().clamp(0, 255).to(torch.uint8)


def pixel_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalized cxcywh [N, 4] (a target's ``boxes``) -> float32 XYXY pixels of a
    (height, width) image."""
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return box_convert(boxes.to(torch.float32).reshape(-1, 4), "cxcywh", "xyxy") * scale


def draw_tile(
    pixels: Tensor, target: Mapping[str, Any], class_names: Sequence[str], tile_size: int
) -> Tensor:
    """uint8 [3, h, w] image with its long side scaled to ``tile_size`` and the target's boxes
    (normalized cxcywh ``boxes``, ``labels``) drawn with their class names."""
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    scale = tile_size / max(height, width)
    fitted = (max(1, round(height * scale)), max(1, round(width * scale)))
    if fitted != (height, width):
        pixels = F.resize(pixels, list(fitted), antialias=True)
    # to the nearest pixel: drawing truncates, which moves edges computed as 19.999.. by one
    boxes = pixel_boxes(target["boxes"], fitted).round()
    labels = torch.as_tensor(target["labels"]).reshape(-1).to(torch.int64)
    captions = [
        class_names[label] if 0 <= label < len(class_names) else str(label)
        for label in labels.tolist()
    ]
    return draw_boxes(pixels, boxes, labels, captions)


def caption_height(tile_size: int) -> int:
    """Height in pixels of the caption strip under each cell."""
    return _font_size(tile_size) + 8


def _font_size(tile_size: int) -> int:
    return max(12, tile_size // 24)


def _cell_size(tile_size: int, with_originals: bool) -> tuple[int, int]:
    """(height, width) of one cell: its panels and their caption strip."""
    panels = 2 if with_originals else 1
    return tile_size + caption_height(tile_size), panels * tile_size + (panels - 1) * PANEL_GAP


def grid_size(
    num_samples: int, columns: int, tile_size: int, *, with_originals: bool = False
) -> tuple[int, int]:
    """(height, width) in pixels of the grid of ``num_samples`` cells (see the module
    docstring); fewer samples than ``columns`` make a narrower grid."""
    if num_samples < 1 or columns < 1 or tile_size < 1:
        raise ValueError(
            f"a grid needs num_samples, columns and tile_size >= 1, got {num_samples}, "
            f"{columns} and {tile_size}"
        )
    columns = min(columns, num_samples)
    rows = math.ceil(num_samples / columns)
    cell_height, cell_width = _cell_size(tile_size, with_originals)
    width = columns * cell_width + (columns + 1) * GRID_MARGIN
    height = rows * cell_height + (rows + 1) * GRID_MARGIN
    return height, width


def augmentation_grid(
    samples: Sequence[tuple[Tensor, Mapping[str, Any]]],
    class_names: Sequence[str],
    *,
    captions: Sequence[str] | None = None,
    originals: Sequence[tuple[Tensor, Mapping[str, Any]]] | None = None,
    columns: int = 4,
    tile_size: int = 384,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """uint8 [3, H, W] grid (size :func:`grid_size`) of ``samples`` in rows of ``columns``.

    ``samples`` are ``(image, target)`` pairs as the training dataset returns them: float
    [3, h, w] normalized with ``mean`` / ``std``, ``target["boxes"]`` normalized cxcywh [N, 4]
    and ``target["labels"]`` [N] indexing ``class_names``. ``originals`` (one per sample, images
    in [0, 1], the same target format) are drawn to the left of their samples; ``captions`` (one
    per sample) under each cell, cut to its width.
    """
    if captions is not None and len(captions) != len(samples):
        raise ValueError(f"got {len(captions)} captions for {len(samples)} samples; give one each")
    if originals is not None and len(originals) != len(samples):
        raise ValueError(
            f"got {len(originals)} originals for {len(samples)} samples; give one each"
        )
    with_originals = bool(originals)
    height, width = grid_size(len(samples), columns, tile_size, with_originals=with_originals)
    canvas = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
    columns = min(columns, len(samples))
    cell_height, cell_width = _cell_size(tile_size, with_originals)
    corners = []
    for position, (image, target) in enumerate(samples):
        row, column = divmod(position, columns)
        top = GRID_MARGIN + row * (cell_height + GRID_MARGIN)
        left = GRID_MARGIN + column * (cell_width + GRID_MARGIN)
        corners.append((top, left))
        tiles = [draw_tile(denormalize(image, mean, std), target, class_names, tile_size)]
        if originals is not None and with_originals:
            original_image, original_target = originals[position]
            tile = draw_tile(
                denormalize(original_image, *UNNORMALIZED), original_target, class_names, tile_size
            )
            tiles.insert(0, tile)
        for panel, tile in enumerate(tiles):
            tile_h, tile_w = int(tile.shape[-2]), int(tile.shape[-1])
            y = top + (tile_size - tile_h) // 2
            x = left + panel * (tile_size + PANEL_GAP) + (tile_size - tile_w) // 2
            canvas[:, y : y + tile_h, x : x + tile_w] = tile
    if captions:
        canvas = _write_captions(canvas, corners, captions, tile_size, cell_width)
    return canvas


def _write_captions(
    canvas: Tensor,
    corners: list[tuple[int, int]],
    captions: Sequence[str],
    tile_size: int,
    cell_width: int,
) -> Tensor:
    """``canvas`` with each caption written under the panels of the cell at its corner."""
    image = F.to_pil_image(canvas)
    draw = ImageDraw.Draw(image)
    font_file, size = caption_font(), _font_size(tile_size)
    font = ImageFont.truetype(font_file, size) if font_file else ImageFont.load_default()
    for (top, left), text in zip(corners, captions):
        draw.text(
            (left + 2, top + tile_size + 4),
            _fitted(text, font, cell_width - 4),
            fill=CAPTION_COLOR,
            font=font,
        )
    return F.pil_to_tensor(image)


def _fitted(text: str, font: Any, width: int) -> str:
    """``text``, cut with an ellipsis where it would be wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a uint8 [3, H, W] image as a PNG at ``path`` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")
    return path
