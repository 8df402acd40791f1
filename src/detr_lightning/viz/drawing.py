"""Detections drawn on their image: one colour per class, captions that scale with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MIN_DRAWN_SIDE",
    "PALETTE",
    "caption_font",
    "draw_boxes",
    "draw_detections",
    "drawing_scale",
]

# Box colours indexed by label (modulo its length): a class keeps its colour across images.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip


# -------------------------------------------------------------------------------- drawing
def caption_font() -> str | None:
    """A TrueType font that scales with the image (matplotlib's DejaVu Sans), if present."""
    try:
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except ImportError:
        return None
    return str(font) if font.is_file() else None


MIN_DRAWN_SIDE = 480  # px: smaller images are drawn enlarged, or captions cover them


def drawing_scale(height: int, width: int) -> int:
    """Integer enlargement of a drawing so that its long side reaches MIN_DRAWN_SIDE."""
    return max(1, -(-MIN_DRAWN_SIDE // max(int(height), int(width), 1)))


def draw_detections(pixels: Tensor, detection: dict[str, Any]) -> Tensor:
    """uint8 [3, H, W] image with the boxes of a :func:`predict` result and "name 0.93" captions.

    Each class keeps one colour of :data:`PALETTE`; line width and captions grow with the image.
    Images whose long side is under :data:`MIN_DRAWN_SIDE` pixels are enlarged by the integer
    factor :func:`drawing_scale` (nearest neighbour) first, so that captions stay legible.
    """
    scale = drawing_scale(*pixels.shape[-2:])
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    if len(detection["scores"]) == 0:
        return pixels
    scores = detection["scores"].tolist()
    captions = [f"{name} {score:.2f}" for name, score in zip(detection["names"], scores)]
    # reversed: boxes are drawn in turn, so the best detection ends up on top
    return draw_boxes(
        pixels, (detection["boxes"] * scale).flip(0), detection["labels"].flip(0), captions[::-1]
    )


def draw_boxes(pixels: Tensor, boxes: Tensor, labels: Tensor, captions: list[str]) -> Tensor:
    """uint8 [3, H, W] image with XYXY pixel ``boxes`` [N, 4] outlined in their ``labels``' colours
    of :data:`PALETTE`, each with its caption on a tab of that colour.

    Boxes are clamped to the image and drawn in turn (the last on top); line width and captions
    grow with the image.
    """
    from torchvision.utils import draw_bounding_boxes

    if len(boxes) == 0:
        return pixels
    height, width = pixels.shape[-2:]
    limits = torch.tensor([width, height, width, height], dtype=torch.float32) - 1
    boxes = boxes.to(torch.float32).clamp(min=torch.zeros(4), max=limits)
    colors = [PALETTE[label % len(PALETTE)] for label in labels.tolist()]
    # black captions on light colours, white on dark (ITU-R BT.601 luma)
    text_colors = [
        (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
        for r, g, b in colors
    ]
    font = caption_font()
    return draw_bounding_boxes(
        pixels,
        boxes,
        labels=list(captions),
        colors=colors,
        width=max(2, round(max(height, width) / 300)),
        font=font,
        font_size=max(12, round(max(height, width) / 50)) if font else None,
        label_colors=text_colors,
        label_background_colors=colors,
        fill_labels=True,
    )
