"""The paper's attention figures: Fig. 6 (per detection, the last decoder layer's
cross-attention above its box) and Fig. 3 (the last encoder layer's self-attention at
reference points), as PNG panels; the maps come from :mod:`detr_lightning.inference.attention`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..inference.attention import detect_with_attention
from ..inference.predictor import Predictor

__all__ = ["attention_panels", "plot_decoder_attention", "plot_encoder_attention"]

MAX_COLUMNS = 8  # panels per row before wrapping


MAX_FIGURE_INCHES = (20.0, 24.0)  # width, height: many detections shrink the cells instead


# ------------------------------------------------------------------------------------ plots
def _check_image(image: Tensor) -> tuple[int, int]:
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(
            f"expected a uint8 image [3, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    return int(image.shape[1]), int(image.shape[2])


def _upsample(attention_map: Tensor, size: tuple[int, int]) -> Tensor:
    """[h, w] -> [H, W] bilinear; cell (i, j) is stretched over its share of the image."""
    grid = attention_map.detach().float().cpu()[None, None]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]


def _figure(num_panels: int, rows_per_panel: int, image_size: tuple[int, int], title: str | None):
    """A Figure with a grid of axes, at most ``MAX_COLUMNS`` panels wide, then wrapped.

    Panel i gets ``rows_per_panel`` stacked axes (all hidden frames). Returns the figure and,
    per panel, its list of axes. Sizes are in inches, at 100 dpi when saved.
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(num_panels, MAX_COLUMNS)
    rows = math.ceil(num_panels / columns) * rows_per_panel
    axes_width = 2.6
    axes_height = min(max(axes_width * image_size[0] / image_size[1], 1.3), 5.2)
    caption = 0.3  # room for each axes' title
    shrink = min(
        1.0,
        (MAX_FIGURE_INCHES[0] - 0.2) / (columns * axes_width),
        max(MAX_FIGURE_INCHES[1] - 1.0 - rows * caption, rows * 0.3) / (rows * axes_height),
    )
    width = columns * axes_width * shrink + 0.2
    # a long title over a narrow panel (one image) wraps instead of being cut
    lines = textwrap.wrap(title, max(int(width / 0.085), 16)) if title else []
    top = caption + 0.05 + 0.2 * len(lines)
    height = rows * (axes_height * shrink + caption) - caption + top + 0.05
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # render with Agg whatever pyplot's backend is
    if lines:
        figure.suptitle("\n".join(lines), fontsize=10, y=1 - 0.05 / height, va="top")
    # Fixed margins in inches, not tight_layout: its extra draw doubles a big panel's time.
    figure.subplots_adjust(
        left=0.1 / width,
        right=1 - 0.1 / width,
        bottom=0.05 / height,
        top=1 - top / height,
        wspace=0.05,
        hspace=caption / (axes_height * shrink),
    )
    grid = figure.subplots(rows, columns, squeeze=False)
    for axis in grid.flat:
        axis.set_axis_off()
    panels = []
    for index in range(num_panels):
        block, column = divmod(index, columns)
        panels.append([grid[block * rows_per_panel + r, column] for r in range(rows_per_panel)])
    return figure, panels


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_decoder_attention(
    image: Tensor,
    boxes: Tensor,
    captions: Sequence[str],
    maps: Tensor,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """PNG panel of the paper's Fig. 6: per detection, its attention map above its box.

    image uint8 [3, H, W]; boxes [N, 4] xyxy in its pixels; captions N strings; maps
    [N, h, w] over the valid feature region (each upsampled to H x W and scaled to its own
    maximum). N = 0 gives the image alone, titled "no detection". Returns ``path``.
    """
    height, width = _check_image(image)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or maps.dim() != 3:
        raise ValueError(
            f"expected boxes [N, 4] and maps [N, h, w], got {tuple(boxes.shape)} and "
            f"{tuple(maps.shape)}"
        )
    if not boxes.shape[0] == maps.shape[0] == len(captions):
        raise ValueError(
            f"{boxes.shape[0]} boxes, {maps.shape[0]} maps and {len(captions)} captions: "
            "pass one of each per detection"
        )
    from matplotlib.patches import Rectangle

    pixels = image.permute(1, 2, 0).cpu().numpy()
    if boxes.shape[0] == 0:
        figure, panels = _figure(1, 1, (height, width), title)
        panels[0][0].imshow(pixels)
        panels[0][0].set_title("no detection", fontsize=9)
        return _save(figure, path)
    figure, panels = _figure(boxes.shape[0], 2, (height, width), title)
    for (map_axis, image_axis), box, caption, attention_map in zip(
        panels, boxes.tolist(), captions, maps
    ):
        map_axis.imshow(_upsample(attention_map, (height, width)).numpy(), cmap="viridis")
        map_axis.set_title(caption, fontsize=8)
        image_axis.imshow(pixels)
        x0, y0, x1, y1 = box
        image_axis.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, edgecolor="red")
        )
    return _save(figure, path)


POINT_COLORS = ("red", "cyan", "yellow", "magenta", "lime", "orange", "white", "blue")


def _cell(
    point: tuple[float, float], cells: tuple[int, int], image_size: tuple[int, int]
) -> tuple[int, int]:
    """Feature cell (row, column) that a point (y, x) in image pixels falls in."""
    return tuple(min(int(p * c / s), c - 1) for p, c, s in zip(point, cells, image_size))


def plot_encoder_attention(
    image: Tensor,
    maps: Tensor,
    points: Sequence[tuple[float, float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """PNG panel of the paper's Fig. 3: the image with reference points, one map per point.

    image uint8 [3, H, W]; maps [h, w, h, w] encoder self-attention over the valid feature
    region (``maps[y, x]`` is the map of cell (y, x)); points (y, x) in image pixels, each
    reading the map of the cell it falls in. Returns ``path``.
    """
    height, width = _check_image(image)
    if maps.dim() != 4 or maps.shape[:2] != maps.shape[2:]:
        raise ValueError(f"expected encoder maps [h, w, h, w], got {tuple(maps.shape)}")
    for y, x in points:
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"point (y={y}, x={x}) is outside the {height}x{width} image")
    cells_y, cells_x = maps.shape[:2]
    pixels = image.permute(1, 2, 0).cpu().numpy()
    figure, panels = _figure(len(points) + 1, 1, (height, width), title)
    panels[0][0].imshow(pixels)
    panels[0][0].set_title("reference points", fontsize=8)
    for index, (y, x) in enumerate(points):
        color = POINT_COLORS[index % len(POINT_COLORS)]
        cell = _cell((y, x), (cells_y, cells_x), (height, width))
        axis = panels[index + 1][0]
        axis.imshow(_upsample(maps[cell], (height, width)).numpy(), cmap="viridis")
        axis.set_title(f"point {index + 1} (y={y:.0f}, x={x:.0f})", fontsize=8)
        for target in (panels[0][0], axis):
            target.plot([x], [y], marker="o", ms=6, mec="black", mfc=color)
    return _save(figure, path)


def _default_stem(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return Path(image).stem
    return "image"


def _default_points(
    boxes: Tensor, cells: tuple[int, int], image_size: tuple[int, int]
) -> list[tuple[float, float]]:
    """(y, x) centres of the first boxes in up to 4 distinct feature cells (several queries
    often find the same object), or 4 points spread over the image without boxes."""
    height, width = image_size
    if len(boxes) == 0:
        return [(height * fy, width * fx) for fy in (0.25, 0.75) for fx in (0.25, 0.75)]
    points, seen = [], set()
    for x0, y0, x1, y1 in boxes.tolist():
        centre = (
            min(max((y0 + y1) / 2, 0.0), height - 1.0),
            min(max((x0 + x1) / 2, 0.0), width - 1.0),
        )
        cell = _cell(centre, cells, image_size)
        if cell not in seen and len(points) < 4:
            seen.add(cell)
            points.append(centre)
    return points


def attention_panels(
    predictor: Predictor,
    image: str | os.PathLike | Image.Image | Tensor,
    out_dir: str | os.PathLike,
    *,
    threshold: float = 0.7,
    points: Sequence[tuple[float, float]] | None = None,
    stem: str | None = None,
    max_detections: int = 16,
) -> list[Path]:
    """Write ``<stem>_decoder.png`` (Fig. 6) and ``<stem>_encoder.png`` (Fig. 3) for one image.

    Detections as :func:`detect_with_attention` (score > ``threshold``), the best
    ``max_detections`` of them plotted. ``points`` (y, x) in original image pixels default to
    the centres of the best boxes in up to 4 distinct feature cells, or 4 points spread over
    the image when nothing is detected. ``stem`` defaults to the file's name, or "image".
    Returns the written paths (no encoder panel for a model without encoder layers).
    """
    found = detect_with_attention(predictor, image, threshold=threshold)
    out_dir = Path(out_dir)
    stem = stem or _default_stem(image)
    heads = predictor.model.transformer.nheads
    shown = min(len(found.captions), max_detections)
    title = f"last decoder layer: cross-attention (mean of {heads} heads), score > {threshold}"
    if shown < len(found.captions):
        title += f", best {shown} of {len(found.captions)}"
    paths = [
        plot_decoder_attention(
            found.image,
            found.boxes[:shown],
            found.captions[:shown],
            found.decoder[:shown],
            out_dir / f"{stem}_decoder.png",
            title=title,
        )
    ]
    if found.encoder is None:
        return paths
    height, width = found.image.shape[1:]
    if points is None:
        points = _default_points(found.boxes[:shown], found.encoder.shape[:2], (height, width))
    encoder_title = f"last encoder layer: self-attention (mean of {heads} heads)"
    paths.append(
        plot_encoder_attention(
            found.image, found.encoder, points, out_dir / f"{stem}_encoder.png", title=encoder_title
        )
    )
    return paths
