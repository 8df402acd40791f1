"""DETR's mask head for panoptic segmentation: an attention map of each object query over the
encoder's memory, refined by a small convolutional network with skip connections from the
backbone into one mask logit map per query at stride 4 (Carion et al. 2020, section 4.4).

The head is trained on top of a detector, frozen (the paper's recipe, ``freeze_detector``) or
jointly. Module and parameter names are the official panoptic checkpoints' (``detr.*``,
``bbox_attention.*``, ``mask_head.*``), so those load as they are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detr import DETR, build_detr


class AttentionMap(nn.Module):
    """Multi-head attention weights of queries over a feature map, softmax over heads and
    positions together (not per head), with no values: [B, Q, heads, h, w].

    Args:
        hidden_dim: width of queries and keys.
        num_heads: heads; ``hidden_dim`` splits evenly among them.
        dropout: on the weights.
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(hidden_dim, hidden_dim)
        self.k_linear = nn.Linear(hidden_dim, hidden_dim)
        for linear in (self.q_linear, self.k_linear):
            nn.init.zeros_(linear.bias)
            nn.init.xavier_uniform_(linear.weight)
        self.scale = (hidden_dim / num_heads) ** -0.5

    def forward(self, queries: Tensor, keys: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """queries [B, Q, E], keys [B, E, h, w], padding_mask [B, h, w] (True on padding) ->
        weights [B, Q, heads, h, w], summing to 1 over (heads, h, w); 0 on padding."""
        batch, num_queries, _ = queries.shape
        height, width = keys.shape[-2:]
        q = self.q_linear(queries).view(batch, num_queries, self.num_heads, -1)
        # the key projection as a 1x1 convolution: the map stays [B, E, h, w]
        k = F.conv2d(keys, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        k = k.view(batch, self.num_heads, -1, height, width)
        weights = torch.einsum("bqnc,bnchw->bqnhw", q * self.scale, k)
        if padding_mask is not None:
            weights = weights.masked_fill(padding_mask[:, None, None], float("-inf"))
        weights = weights.flatten(2).softmax(-1).view(weights.shape)
        return self.dropout(weights)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 8 groups, as the official head (every width of the paper's model divides
    by 8); fewer where a narrow model's channels do not."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class MaskHead(nn.Module):
    """Convolutional mask decoder: the projected features of each query, concatenated with its
    attention maps, go through 3x3 conv + GroupNorm + ReLU blocks that halve the width while
    upsampling (nearest) to the strides of three backbone stages, adding each stage through a
    1x1 adapter; a last 3x3 convolution gives one logit per pixel.

    Args:
        hidden_dim: width E of the projected features (the transformer's).
        num_heads: attention maps per query (the :class:`AttentionMap`'s heads).
        stage_channels: channels of the backbone stages added, coarsest first (ResNet-50:
            layer3, layer2, layer1 = 1024, 512, 256).

    The widths are the official ones: E + heads, E + heads, E/2, E/4, E/8, E/16, 1
    (264, 264, 128, 64, 32, 16, 1 at E = 256).
    """

    def __init__(self, hidden_dim: int, num_heads: int, stage_channels: Sequence[int]) -> None:
        super().__init__()
        if len(stage_channels) != 3:
            raise ValueError(f"expected three backbone stages' channels, got {stage_channels}")
        dim = hidden_dim + num_heads
        widths = [dim, hidden_dim // 2, hidden_dim // 4, hidden_dim // 8, hidden_dim // 16]
        if widths[-1] < 1:
            raise ValueError(f"hidden_dim {hidden_dim} is too narrow for the mask head (>= 16)")
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = _group_norm(dim)
        self.lay2 = nn.Conv2d(dim, widths[1], 3, padding=1)
        self.gn2 = _group_norm(widths[1])
        self.lay3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.gn3 = _group_norm(widths[2])
        self.lay4 = nn.Conv2d(widths[2], widths[3], 3, padding=1)
        self.gn4 = _group_norm(widths[3])
        self.lay5 = nn.Conv2d(widths[3], widths[4], 3, padding=1)
        self.gn5 = _group_norm(widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(stage_channels[0], widths[1], 1)
        self.adapter2 = nn.Conv2d(stage_channels[1], widths[2], 1)
        self.adapter3 = nn.Conv2d(stage_channels[2], widths[3], 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: Tensor, attention: Tensor, stages: Sequence[Tensor]) -> Tensor:
        """features [B, E, h, w], attention [B, Q, heads, h, w], stages: three backbone maps
        [B, C_i, h_i, w_i], coarsest first -> mask logits [B * Q, 1, h_3, w_3] (query-major
        within each image)."""
        num_queries = attention.shape[1]
        x = torch.cat(
            [features.repeat_interleave(num_queries, 0), attention.flatten(0, 1)], dim=1
        )  # [B * Q, E + heads, h, w]
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        blocks = ((self.adapter1, self.lay3, self.gn3), (self.adapter2, self.lay4, self.gn4),
                  (self.adapter3, self.lay5, self.gn5))  # fmt: skip
        for stage, (adapter, conv, norm) in zip(stages, blocks):
            skip = adapter(stage).repeat_interleave(num_queries, 0)
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


class DETRSegmentation(nn.Module):
    """DETR with the mask head: the detector's outputs plus ``pred_masks``.

    Args:
        detr: the detector; its backbone must give :meth:`~Backbone.stages` (at least three).
        freeze_detector: the paper's recipe (the official ``--frozen_weights``): the detector's
            weights are not trained and its forward keeps no graph; only the head learns. The
            detector still follows ``train()`` / ``eval()`` (dropout in training, as there).

    ``model.freeze_detector`` in the config; the rest are the detector's settings.
    """

    def __init__(self, detr: DETR, freeze_detector: bool = False) -> None:
        super().__init__()
        self.detr = detr
        hidden_dim, num_heads = detr.transformer.hidden_dim, detr.transformer.nheads
        channels = getattr(detr.backbone, "stage_channels", None)
        if channels is None or len(channels) < 3:
            raise ValueError(
                "the mask head needs a backbone with stage outputs (Backbone.stages) of at "
                f"least three stages; got {type(detr.backbone).__name__} with {channels}"
            )
        self.bbox_attention = AttentionMap(hidden_dim, num_heads, dropout=0.0)
        self.mask_head = MaskHead(hidden_dim, num_heads, channels[2::-1])
        self.freeze_detector = bool(freeze_detector)
        if self.freeze_detector:
            self.detr.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.detr.num_classes

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    @property
    def aux_loss(self) -> bool:
        return self.detr.aux_loss

    @property
    def has_denoising(self) -> bool:
        return self.detr.has_denoising

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        padding_mask: Tensor | None = None,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> dict[str, Any]:
        """The detector's outputs (:meth:`DETR.forward`) and ``pred_masks`` [B, Q, H/4, W/4]:
        one mask logit map per query, at stride 4 of the padded batch (its size is that of
        the backbone's first stage: ``ceil(H / 4)`` for a ResNet)."""
        frozen = self.freeze_detector and torch.is_grad_enabled()
        with torch.no_grad() if frozen else contextlib.nullcontext():
            outputs, encoded = self.detr.run(images, padding_mask, targets, keep_stages=True)
        queries = encoded.hidden[-1, :, : self.detr.num_queries]  # [B, Q, E]
        attention = self.bbox_attention(queries, encoded.memory, encoded.mask)
        stages = encoded.stages[2::-1]  # layer3, layer2, layer1
        masks = self.mask_head(encoded.projected, attention, stages)
        outputs["pred_masks"] = masks.view(*queries.shape[:2], *masks.shape[-2:])
        return outputs


def build_detr_segmentation(
    detr: DETR | Mapping[str, Any], *, freeze_detector: bool = False
) -> DETRSegmentation:
    """The panoptic model from a detector or the ``model`` config group's detector settings
    (:func:`~detr_lightning.models.detr.build_detr`'s)."""
    if not isinstance(detr, DETR):
        detr = build_detr(**detr)
    return DETRSegmentation(detr, freeze_detector=freeze_detector)
