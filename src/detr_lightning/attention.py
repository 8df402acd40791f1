"""Attention maps of a DETR model, as in the paper's Fig. 3 and Fig. 6 (Carion et al., 2020).

Our :class:`~detr_lightning.models.transformer.MultiheadAttention` runs on
``scaled_dot_product_attention`` and never materializes its weights, so they are recomputed
here from the very inputs the layers received (captured by temporary forward hooks) and the
layers' own q/k projections: ``softmax(q k^T / sqrt(d_head))`` with ``-inf`` on padding keys.

- Fig. 6: cross-attention of the last decoder layer, one map per object query over the
  encoder's feature grid. The paper shows single heads; here the heads are averaged.
- Fig. 3: self-attention of the last encoder layer, one map per reference point.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.images import inference_transform, read_image
from .models.transformer import MultiheadAttention

if TYPE_CHECKING:
    from PIL import Image

    from .module import DETRModule

__all__ = [
    "AttentionMaps",
    "DetectionAttention",
    "attention_panels",
    "attention_weights",
    "capture_attention",
    "detect_with_attention",
    "plot_decoder_attention",
    "plot_encoder_attention",
]

MAX_COLUMNS = 8  # panels per row before wrapping
MAX_FIGURE_INCHES = (20.0, 24.0)  # width, height: many detections shrink the cells instead


@torch.no_grad()
def attention_weights(
    attn: MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None = None,
    *,
    average_heads: bool = False,
) -> Tensor:
    """Attention weights of ``attn`` for the inputs it was called with, in float32.

    query [B, Lq, E], key [B, Lk, E], key_padding_mask [B, Lk] bool (True = padding).
    Returns [B, heads, Lq, Lk] (or [B, Lq, Lk] averaged over heads); rows sum to 1, padding
    keys get exactly 0. Rows whose keys are all padding (undefined) are 0.
    """
    embed, heads = attn.embed_dim, attn.num_heads
    head_dim = embed // heads
    batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
    weight, bias = attn.in_proj_weight.float(), attn.in_proj_bias.float()
    # float32 whatever autocast says: the maps are for reading, not for speed
    with torch.autocast(query.device.type, enabled=False):
        q = F.linear(query.float(), weight[:embed], bias[:embed])
        k = F.linear(key.float(), weight[embed : 2 * embed], bias[embed : 2 * embed])
    q = q.view(batch, len_q, heads, head_dim).transpose(1, 2) / math.sqrt(head_dim)
    k = k.view(batch, len_k, heads, head_dim).transpose(1, 2)
    padding = None if key_padding_mask is None else key_padding_mask[:, None, :]

    def head_weights(head: int) -> Tensor:  # [B, Lq, Lk]
        scores = q[:, head] @ k[:, head].transpose(1, 2)
        if padding is not None:
            scores = scores.masked_fill(padding, float("-inf"))
        return scores.softmax(-1).nan_to_num(0.0)

    if not average_heads:
        return torch.stack([head_weights(head) for head in range(heads)], dim=1)
    # One head at a time: the encoder's [B, heads, hw, hw] would be ~0.5 GB for DC5 at 800 px.
    total = head_weights(0)
    for head in range(1, heads):
        total += head_weights(head)
    return total / heads


@dataclass
class AttentionMaps:
    """Model outputs of one forward pass and the attention maps of that pass.

    ``outputs``: what the model returned, untouched. ``decoder`` [B, Q, h, w]: last decoder
    layer's cross-attention of each query over the feature grid. ``encoder`` [B, h, w, h, w]
    (None without encoder layers): last encoder layer's self-attention, ``encoder[b, y, x]``
    being the map of reference cell (y, x). Both averaged over heads. ``feature_mask``
    [B, h, w] bool, True on padding cells (where every map is 0).
    """

    outputs: dict[str, Any]
    decoder: Tensor
    encoder: Tensor | None
    feature_mask: Tensor

    def valid_size(self, index: int) -> tuple[int, int]:
        """(h_i, w_i): the feature cells of image ``index`` (padding is bottom/right)."""
        valid = ~self.feature_mask[index]
        return int(valid.any(1).sum()), int(valid.any(0).sum())

    def crop(self, index: int) -> tuple[Tensor, Tensor | None]:
        """Maps of image ``index`` without padding cells: [Q, h_i, w_i], [h_i, w_i, h_i, w_i]."""
        height, width = self.valid_size(index)
        decoder = self.decoder[index, :, :height, :width]
        if self.encoder is None:
            return decoder, None
        return decoder, self.encoder[index, :height, :width, :height, :width]


def _last_attention_layers(
    model: nn.Module,
) -> tuple[MultiheadAttention | None, MultiheadAttention]:
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(transformer, "decoder"):
        raise ValueError(
            f"capture_attention needs a DETR model with a .transformer, got {type(model).__name__}"
            " (for a DETRModule pass module.model)"
        )
    decoder = transformer.decoder.layers[-1].multihead_attn
    encoder_layers = transformer.encoder.layers
    encoder = encoder_layers[-1].self_attn if len(encoder_layers) else None
    for layer in (decoder, encoder):
        if layer is not None and not isinstance(layer, MultiheadAttention):
            raise ValueError(
                f"expected detr_lightning's MultiheadAttention, got {type(layer).__name__}"
            )
    return encoder, decoder


@torch.no_grad()
def capture_attention(
    model: nn.Module, images: Tensor, padding_mask: Tensor | None = None
) -> AttentionMaps:
    """Run ``model`` once on a batch and recompute the attention it used.

    images [B, 3, H, W] normalized; padding_mask [B, H, W] bool, True on padding (None: no
    padding). The model must be in eval mode: in training mode dropout makes the attention
    random. Hooks are removed afterwards, also when the forward pass raises.
    """
    if model.training:
        raise ValueError("capture_attention needs model.eval(): dropout randomizes the attention")
    encoder_attn, decoder_attn = _last_attention_layers(model)
    calls: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}

    def recorder(name: str):
        def hook(module, args, kwargs, output) -> None:
            named = dict(zip(("query", "key", "value", "key_padding_mask"), args))
            named.update(kwargs)
            calls[name] = (named["query"], named["key"], named.get("key_padding_mask"))

        return hook

    def record_feature_mask(module, args, kwargs) -> None:
        calls["feature_mask"] = args[1] if len(args) > 1 else kwargs["padding_mask"]

    handles = [
        model.transformer.register_forward_pre_hook(record_feature_mask, with_kwargs=True),
        decoder_attn.register_forward_hook(recorder("decoder"), with_kwargs=True),
    ]
    if encoder_attn is not None:
        handles.append(encoder_attn.register_forward_hook(recorder("encoder"), with_kwargs=True))
    try:
        outputs = model(images, padding_mask)
    finally:
        for handle in handles:
            handle.remove()

    if "decoder" not in calls or (encoder_attn is not None and "encoder" not in calls):
        raise RuntimeError(
            "the model's forward did not run the last encoder/decoder attention of "
            "model.transformer; capture_attention needs DETR.forward's path through them"
        )
    feature_mask = calls["feature_mask"]
    batch, height, width = feature_mask.shape
    decoder = attention_weights(decoder_attn, *calls["decoder"], average_heads=True)
    encoder = None
    if encoder_attn is not None:
        encoder = attention_weights(encoder_attn, *calls["encoder"], average_heads=True)
        encoder = encoder.view(batch, height, width, height, width)
    return AttentionMaps(outputs, decoder.view(batch, -1, height, width), encoder, feature_mask)


@dataclass
class DetectionAttention:
    """Detections of one image with the attention behind them.

    ``image`` uint8 [3, H, W] as read; ``inputs`` [3, H', W'] the normalized model input;
    ``outputs`` the model's raw outputs; ``queries``, ``scores``, ``labels`` [N] (highest score
    first); ``boxes`` [N, 4] xyxy in pixels of ``image``; ``captions`` N strings;
    ``decoder`` [N, h, w] and ``encoder`` [h, w, h, w] (or None) over the feature grid.
    """

    image: Tensor
    inputs: Tensor
    outputs: dict[str, Any]
    queries: Tensor
    scores: Tensor
    labels: Tensor
    boxes: Tensor
    captions: list[str]
    decoder: Tensor
    encoder: Tensor | None


@torch.no_grad()
def detect_with_attention(
    module: DETRModule,
    image: str | os.PathLike | Image.Image | Tensor,
    *,
    threshold: float = 0.7,
) -> DetectionAttention:
    """Detect objects in one image exactly as evaluation does, keeping the attention maps.

    ``image`` is anything :func:`~detr_lightning.data.images.read_image` accepts. A detection is
    a query whose best class (softmax, "no object" excluded) scores > ``threshold`` and whose
    label has a category (labels with category id -1 are skipped). The module runs in eval
    mode and is put back in its previous mode afterwards.
    """
    original = read_image(image)
    inputs = inference_transform(module.hparams.get("data"))(original)
    model = module.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        maps = capture_attention(model, inputs[None].to(device))
    finally:
        model.train(was_training)

    from .predict import select_detections

    detections = select_detections(
        maps.outputs["pred_logits"][0].float().cpu(),
        maps.outputs["pred_boxes"][0].float().cpu(),
        (int(original.shape[1]), int(original.shape[2])),
        threshold=threshold,
        category_ids=torch.as_tensor(module.category_ids()),
        names=module.class_names,
    )
    queries = detections["queries"]
    captions = [
        f"{name} {score:.2f}"
        for name, score in zip(detections["names"], detections["scores"].tolist())
    ]
    decoder, encoder = maps.crop(0)
    return DetectionAttention(
        image=original,
        inputs=inputs,
        outputs=maps.outputs,
        queries=queries,
        scores=detections["scores"],
        labels=detections["labels"],
        boxes=detections["boxes"],
        captions=captions,
        decoder=decoder[queries.to(decoder.device)].cpu(),
        encoder=None if encoder is None else encoder.cpu(),
    )


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
    module: DETRModule,
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
    found = detect_with_attention(module, image, threshold=threshold)
    out_dir = Path(out_dir)
    stem = stem or _default_stem(image)
    heads = module.model.transformer.nhead
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
