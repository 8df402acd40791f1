"""The graph that deployment exports trace: DETR with the signature (images, padding_mask) ->
(pred_logits, pred_boxes), and a padding mask resized the same way in every runtime."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..models.detr import DETR

log = logging.getLogger(__name__)

__all__ = [
    "DeployableDETR",
    "ExactMaskBackbone",
    "detr_of",
    "example_inputs",
    "nearest_resize_mask",
]

INPUT_NAMES = ("images", "padding_mask")


OUTPUT_NAMES = ("pred_logits", "pred_boxes")


# Symbolic sizes of the exported graphs, as the ONNX dynamic axes and the sidecar name them.
DYNAMIC_AXES = {
    "images": {0: "batch", 2: "height", 3: "width"},
    "padding_mask": {0: "batch", 1: "height", 2: "width"},
    "pred_logits": {0: "batch"},
    "pred_boxes": {0: "batch"},
}


# ------------------------------------------------------------------------- exported graph
def nearest_source_index(out_size: int | Tensor, in_size: int | Tensor, device) -> Tensor:
    """Indices [out_size] int64 of the input rows that torch's nearest resize reads.

    PyTorch's nearest kernel reads row ``floor(i * (in / out))``, ratio and product in
    float32, clamped to ``in - 1``. Sizes may be the 0-dim tensors that tracing hands out for
    ``tensor.shape``, so the arithmetic stays in the graph and follows the input size.
    """
    if isinstance(in_size, Tensor):  # traced: keep the size in the graph
        in_size_float = in_size.to(device=device, dtype=torch.float32)
    else:
        in_size_float = torch.tensor(float(in_size), device=device)
    scale = in_size_float / out_size
    index = torch.arange(out_size, dtype=torch.float32, device=device) * scale
    return index.floor().long().clamp(max=in_size - 1)


def nearest_resize_mask(padding_mask: Tensor, size: Sequence[int] | torch.Size) -> Tensor:
    """[B, H, W] bool -> [B, h, w] bool, equal to ``models.backbone.resize_mask``.

    Computed by gathering the rows and columns torch's nearest resize reads, which an exported
    graph reproduces exactly; see :class:`ExactMaskBackbone` for why.
    """
    device = padding_mask.device
    rows = nearest_source_index(size[0], padding_mask.shape[1], device)
    cols = nearest_source_index(size[1], padding_mask.shape[2], device)
    return padding_mask.index_select(1, rows).index_select(2, cols)


class ExactMaskBackbone(nn.Module):
    """The model's backbone, with the padding mask resized by explicit indices.

    ``resize_mask`` (``F.interpolate``, nearest) becomes an ONNX ``Resize`` node with both
    exporters, and onnxruntime's Resize picks a neighbouring source row for many sizes: with
    a batch padded to 120 rows, stride 32 (4 feature rows) and an image 60 rows high, torch
    marks feature row 2 as padding and onnxruntime does not. The padding boundary then moves
    by one feature cell, which changes the attention mask and the position encoding, so the
    outputs differ by far more than rounding. Gathering the rows torch reads is exact in every
    runtime. The backbone's own forward still runs unchanged for the features.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], padding_mask [B, H, W] -> features [B, C, h, w], mask [B, h, w]."""
        features, _ = self.backbone(images, padding_mask)
        return features, nearest_resize_mask(padding_mask, features.shape[-2:])


class DeployableDETR(nn.Module):
    """DETR with the exported signature: (images, padding_mask) -> (pred_logits, pred_boxes).

    Holds a float32 CPU copy of the model in eval mode without auxiliary outputs (nor
    training-only queries) and with the
    backbone on the padded batch (``batch_invariant`` off: its per-image loop would be traced
    for the example's sizes; one image per call gives the same results); the caller's model is
    left as it was. images [B, 3, H, W] float32, padding_mask [B, H, W] bool (True on
    padding) -> pred_logits [B, Q, C + 1], pred_boxes [B, Q, 4] cxcywh in [0, 1].
    """

    def __init__(self, model: DETR) -> None:
        super().__init__()
        model = copy.deepcopy(model).float().cpu().eval()
        model.aux_loss = False  # nothing to drop after tracing, no tracer warnings about it
        model.training_queries = None  # training-only parameters: not part of the export
        if model.batch_invariant:
            log.info("exporting the padded-batch backbone: batch_invariant is not exported")
            model.batch_invariant = False
        model.backbone = ExactMaskBackbone(model.backbone)
        self.model = model

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images, padding_mask)
        return out["pred_logits"], out["pred_boxes"]


def detr_of(module: nn.Module) -> DETR:
    model = getattr(module, "model", module)
    if not isinstance(model, DETR):
        raise TypeError(
            f"expected a DETRModule (e.g. from load_pretrained) or a DETR, got "
            f"{type(module).__name__}"
        )
    return model


def example_inputs(example_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """A traced example: 2 random images [2, 3, H, W], the second 3/4 as large, and its mask.

    Two images of different sizes make the example batch carry real padding; the exported
    graph does not depend on the example's sizes.
    """
    if len(example_size) != 2 or min(int(s) for s in example_size) < 64:
        raise ValueError(
            f"example_size must be (height, width), each at least 64 pixels; got {example_size}"
        )
    height, width = (int(s) for s in example_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, height, width, generator=generator)
    padding_mask = torch.zeros(2, height, width, dtype=torch.bool)
    padding_mask[1, height * 3 // 4 :, :] = True
    padding_mask[1, :, width * 3 // 4 :] = True
    images[padding_mask[:, None].expand_as(images)] = 0.0
    return images, padding_mask
