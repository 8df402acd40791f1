"""The DETR detector: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.padding import pad_images
from ..utils.signatures import split_keywords
from .backbone import Backbone, resize_mask
from .position_encoding import build_position_encoding
from .training_queries import DecoderQueries, Denoising, TrainingQueries
from .transformer import Transformer


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out) for d_in, d_out in zip(dims, dims[1:] + [output_dim])
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


NO_DENOISING = Denoising()  # the default: groups 0


@dataclass
class Encoded:
    """What DETR computes on the way to its predictions, for heads on top of it.

    ``stages``: the backbone's stage outputs (layer1 first: strides 4, 8, 16, ...) when asked
    for, else empty; ``projected`` [B, E, h, w]: the last stage after the 1x1 projection;
    ``memory`` [B, E, h, w]: the encoder's output; ``mask`` [B, h, w] bool, True on padding;
    ``hidden`` [L, B, Q', E]: every decoder layer's output (Q' = Q, or in training more: the
    model's own queries first, then training-only ones).
    """

    stages: list[Tensor]
    projected: Tensor
    memory: Tensor
    mask: Tensor
    hidden: Tensor


class DETR(nn.Module):
    """DEtection TRansformer. Always returns predictions, never losses.

    Args:
        backbone: feature extractor with ``num_channels`` and ``forward(images, mask)``.
        transformer: encoder-decoder with ``hidden_dim``.
        num_classes: number of object classes; the classifier has one more output, the last
            being "no object". For the official COCO checkpoints this is 91 (max id + 1).
        num_queries: number of object queries (max detections per image).
        aux_loss: also return predictions of every earlier decoder layer.
        position_embedding: "sine" (the paper's normalized sine encoding) or "learned", or a
            module that maps the [B, h, w] padding mask to [B, hidden_dim, h, w].
        batch_invariant: run the backbone on each image's own unpadded pixels, so that an
            image's predictions do not depend on the other images of its batch (see
            :meth:`forward`). Off by default: the official checkpoints were trained and
            evaluated on padded batches. An attribute too, to switch at evaluation time; it
            holds no weights.
        query_groups: groups of object queries in training (Group DETR), the model's own
            included; 1: off. Training only: evaluation, prediction and export use the
            model's own queries (see :mod:`~detr_lightning.models.training_queries`).
        denoising: denoising queries in training (DN-DETR): :class:`Denoising` settings or
            their mapping, ``{groups: 0, label_noise: 0.2, box_noise: 0.4}``; groups 0: off.

    The defaults are the paper's DETR on COCO; ``num_classes``, ``num_queries``,
    ``aux_loss``, ``position_embedding`` and ``batch_invariant`` are keys of the ``model``
    config group (:func:`build_detr`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        transformer: Transformer,
        num_classes: int = 91,
        num_queries: int = 100,
        aux_loss: bool = True,
        position_embedding: str | nn.Module = "sine",
        batch_invariant: bool = False,
        query_groups: int = 1,
        denoising: Denoising | Mapping[str, Any] = NO_DENOISING,
    ) -> None:
        super().__init__()
        hidden_dim = transformer.hidden_dim
        self.backbone = backbone
        self.transformer = transformer
        if isinstance(position_embedding, str):
            position_embedding = build_position_encoding(position_embedding, hidden_dim)
        self.position_encoding = position_embedding
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.batch_invariant = batch_invariant
        if int(query_groups) != query_groups or query_groups < 1:
            raise ValueError(f"query_groups={query_groups}: a whole number >= 1 (1: off)")
        denoising = Denoising.of(denoising)
        self.training_queries = (
            TrainingQueries(num_queries, hidden_dim, num_classes, query_groups, denoising)
            if TrainingQueries.wanted(query_groups, denoising)
            else None
        )

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        padding_mask: Tensor | None = None,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Detect objects.

        Args:
            images: a list of normalized [3, H_i, W_i] tensors (padded here, bottom/right), or
                a padded batch [B, 3, H, W].
            padding_mask: [B, H, W] bool, True on padding; only with a batch (default: none).
        Returns:
            ``pred_logits`` [B, Q, num_classes + 1] (unnormalized; last = no object),
            ``pred_boxes`` [B, Q, 4] cxcywh in [0, 1] relative to each unpadded image, and
            ``aux_outputs``: a list with the same two keys for decoder layers 1..L-1 when
            ``aux_loss`` is on. In training with ``query_groups`` > 1 these are group 0's,
            and ``group_outputs`` holds the other groups' (a list of dicts with the same
            keys); with denoising queries (which need ``targets``, per image ``labels`` and
            ``boxes``), ``dn_outputs`` holds their predictions and the ground truth they
            reconstruct (see :meth:`_split_training_outputs`).

        By default the backbone runs on the padded batch: convolutions near the bottom/right
        border of a smaller image see the padding, so its outputs depend on its batch (as in
        the official code). With ``batch_invariant`` each image goes through the backbone
        alone (images of one size together), and only its feature map is padded: every
        image gets the predictions it would get in a batch of one, up to float rounding.
        """
        return self.run(images, padding_mask, targets)[0]

    def run(
        self,
        images: Tensor | Sequence[Tensor],
        padding_mask: Tensor | None = None,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        *,
        keep_stages: bool = False,
    ) -> tuple[dict[str, Any], Encoded]:
        """:meth:`forward`'s outputs and the intermediate tensors that a head on top of the
        detector reads (:class:`Encoded`); ``keep_stages``: also every backbone stage's output
        (the eager trunk; not with ``batch_invariant``)."""
        if not isinstance(images, Tensor):
            if padding_mask is not None:
                raise ValueError("padding_mask is computed for a list of images; pass None")
            images, padding_mask = pad_images(images)
        elif images.dim() != 4:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        elif padding_mask is None:
            padding_mask = images.new_zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        stages: list[Tensor] = []
        if keep_stages:
            if self.batch_invariant:
                raise ValueError(
                    "batch_invariant runs the backbone per image and keeps no stage outputs; "
                    "set model.batch_invariant=false for a model with a mask head"
                )
            stages = self.backbone.stages(images.contiguous(memory_format=torch.channels_last))
            features = stages[-1]
            mask = resize_mask(padding_mask, features.shape[-2:])
        elif self.batch_invariant:
            features, mask = self._backbone_per_image(images, padding_mask)
        else:
            features, mask = self.backbone(images, padding_mask)
        pos = self.position_encoding(mask).to(features.dtype)
        queries: Tensor | DecoderQueries = self.query_embed.weight
        if self.training and self.training_queries is not None:
            queries = self.training_queries(queries, features.shape[0], targets)
        projected = self.input_proj(features)
        hidden, memory = self.transformer(projected, mask, queries, pos)
        # The heads run in fp32 even under autocast: bf16 keeps 8 bits of mantissa, which moves
        # a box coordinate in [0, 1] by up to ~4e-3 after the sigmoid, and the logits decide
        # both the matching and the scores. They are a tiny share of the compute.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            shape = hidden.shape[:-1]
            flat = hidden.float().flatten(0, -2)  # [L * B * Q, E]: plain matrix products
            logits = self.class_embed(flat).view(*shape, self.class_embed.out_features)
            boxes = self.bbox_embed(flat).sigmoid().view(*shape, 4)  # [L, B, Q, 4]
        encoded = Encoded(stages, projected, memory, mask, hidden)
        if isinstance(queries, DecoderQueries):
            return self._split_training_outputs(logits, boxes, queries), encoded
        return self._outputs(logits, boxes), encoded

    def _outputs(self, logits: Tensor, boxes: Tensor) -> dict[str, Any]:
        """The output dict of every layer's [L, B, Q, ...] predictions."""
        out: dict = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
                for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])
            ]
        return out

    def _split_training_outputs(
        self, logits: Tensor, boxes: Tensor, queries: DecoderQueries
    ) -> dict[str, Any]:
        """Group 0's outputs as in evaluation, the other groups' in ``group_outputs``, and in
        ``dn_outputs`` the denoising queries' ``pred_logits`` [L', B, D, T, C+1] and
        ``pred_boxes`` [L', B, D, T, 4] (L' = every layer with ``aux_loss``, else the last
        one; the final layer first, as the loss orders layers) with the ground truth they
        reconstruct (``labels`` [B, T], ``boxes`` [B, T, 4], ``valid`` [B, T])."""
        count = queries.num_queries
        groups = []
        for g in range(queries.groups):
            part = slice(g * count, (g + 1) * count)
            groups.append(self._outputs(logits[:, :, part], boxes[:, :, part]))
        out = groups[0]
        if queries.groups > 1:
            out["group_outputs"] = groups[1:]
        if queries.denoising_groups:
            start = queries.groups * count
            last = logits.shape[0] - 1  # the final layer first, then the others in order
            order = [last, *range(last)] if self.aux_loss else [last]
            shape = (queries.denoising_groups, queries.max_targets)
            dn_logits = logits[order, :, start:]
            dn_boxes = boxes[order, :, start:]
            out["dn_outputs"] = {
                "pred_logits": dn_logits.view(*dn_logits.shape[:2], *shape, -1),
                "pred_boxes": dn_boxes.view(*dn_boxes.shape[:2], *shape, 4),
                "labels": queries.labels,
                "boxes": queries.boxes,
                "valid": queries.valid,
            }
        return out

    @property
    def has_denoising(self) -> bool:
        """Whether training adds denoising queries (and their loss terms)."""
        queries = self.training_queries
        return queries is not None and queries.denoising.groups > 0

    @property
    def channels_last(self) -> bool:
        """Whether the model was converted with ``.to(memory_format=torch.channels_last)``.

        Judged on the first convolution weight whose layout tells (more than one input
        channel and a kernel larger than 1x1): a 1x1 kernel such as ``input_proj``'s is
        contiguous in both layouts, so it would say yes for every model.
        """
        for weight in self.backbone.parameters():
            if weight.dim() != 4:
                continue
            # asked of the strides, not the shape: under torch.jit.trace (export) a parameter's
            # sizes are traced values, and comparing them warns that the trace may not generalize
            standard = weight.is_contiguous()
            last = weight.is_contiguous(memory_format=torch.channels_last)
            if standard != last:  # the layouts differ: the weight tells which one it has
                return last
        return False

    def _backbone_per_image(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features of each image's own pixels, padded to the batch's largest map.

        images [B, 3, H, W] with each image's valid pixels in its top-left corner (as
        ``pad_images`` leaves them), padding_mask [B, H, W] -> features [B, C, h, w] (zero
        beyond each image's own feature size) and mask [B, h, w] (True there).
        """
        valid = ~padding_mask
        heights, widths = valid.any(2).sum(1), valid.any(1).sum(1)
        rectangles = _top_left_rectangles(heights, widths, valid.shape[1], valid.shape[2])
        sizes = torch.stack((heights, widths), 1).tolist()
        if not torch.equal(rectangles, valid) or min(h for h, _ in sizes) == 0:
            raise ValueError(
                "batch_invariant needs every image's valid pixels (padding_mask False) to fill "
                "a non-empty rectangle in its top-left corner; pad bottom/right as pad_images"
            )
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(sizes):
            groups.setdefault((height, width), []).append(index)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        by_index: dict[int, Tensor] = {}
        for (height, width), indices in groups.items():
            # images of one size share a backbone call: no padding among them
            crops = images[indices, :, :height, :width].contiguous(memory_format=memory_format)
            features, _ = self.backbone(crops, padding_mask.new_zeros(len(indices), height, width))
            by_index.update(zip(indices, features))
        maps = [by_index[index] for index in range(len(sizes))]
        map_height = max(int(m.shape[1]) for m in maps)
        map_width = max(int(m.shape[2]) for m in maps)
        padded = [F.pad(m, (0, map_width - m.shape[2], 0, map_height - m.shape[1])) for m in maps]
        features = torch.stack(padded)
        # the mask follows each image's own feature size, as in a batch of one
        map_sizes = torch.tensor([tuple(m.shape[1:]) for m in maps], device=images.device)
        mask = ~_top_left_rectangles(map_sizes[:, 0], map_sizes[:, 1], map_height, map_width)
        return features, mask


def _top_left_rectangles(heights: Tensor, widths: Tensor, height: int, width: int) -> Tensor:
    """[B, height, width] bool, True inside each item's top-left ``heights[i] x widths[i]``."""
    rows = torch.arange(height, device=heights.device)
    cols = torch.arange(width, device=heights.device)
    return (rows < heights[:, None])[:, :, None] & (cols < widths[:, None])[:, None, :]


def build_detr(backbone: nn.Module | str | Mapping[str, Any] = "resnet50", **settings: Any) -> DETR:
    """DETR from one flat set of settings: the ``model`` config group's keys.

    ``settings`` are the arguments of :class:`Transformer` (``hidden_dim``, ``nheads``,
    ``enc_layers``, ``dec_layers``, ``dim_feedforward``, ``dropout``, ``pre_norm``) and those of
    :class:`DETR` beside its two modules (``num_classes``, ``num_queries``, ``aux_loss``,
    ``position_embedding``, ``batch_invariant``, and the training-only ``query_groups`` and
    ``denoising``), under the names those take; what is left
    out takes their defaults, the paper's DETR-R50 on COCO. ``backbone`` is a module, a
    :class:`Backbone`'s ``name``, or its arguments (the ``backbone`` config group).
    """
    if isinstance(backbone, str):
        backbone = Backbone(backbone)
    elif isinstance(backbone, Mapping):
        backbone = Backbone(**backbone)
    detr, transformer = split_keywords(settings, DETR, Transformer, exclude=DETR_MODULES)
    return DETR(backbone, Transformer(**transformer), **detr)


# DETR's arguments that are modules, not settings
DETR_MODULES = ("backbone", "transformer")
