"""DETR in the formulation of the original release, as a speed and output reference.

Written from the paper (Carion et al., "End-to-End Object Detection with Transformers", 2020)
and the published design of its reference implementation, not imported from
``detr_lightning``, so it is an independent check of our model:

- trunk: torchvision ResNet with ``FrozenBatchNorm2d``, the stem and ``layer1..layer4`` kept
  in a module dict and run in order (what ``IntermediateLayerGetter`` does); the padding mask
  is resized with nearest interpolation;
- backbone and position encoding joined as ``backbone.0`` / ``backbone.1``, which gives the
  official parameter names (``backbone.0.body.layer1.0.conv1.weight``, ...);
- transformer on ``nn.MultiheadAttention`` with sequence-first ``[HW, B, E]`` activations;
  every encoder layer adds ``pos`` to its input, every decoder layer adds ``pos`` to the
  memory again and ``query_pos`` to its queries; post-norm layers; the decoder returns each
  layer's output after the shared final ``LayerNorm``;
- class head ``Linear`` and 3-layer box ``MLP`` with a sigmoid.

It loads a state dict in the official layout; ``official_state_dict`` produces one from a
``detr_lightning`` DETR (only ``backbone.`` becomes ``backbone.0.``).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d


class ResNetTrunk(nn.Module):
    """Runs a torchvision ResNet's stem and stages in order and returns the last stage.

    Args:
        name: torchvision ResNet name (resnet18 ... resnet101).
        dilation: dilate ``layer4`` instead of striding it (the DC5 variant).
    """

    def __init__(self, name: str, dilation: bool) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d,
        )
        stages = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.body = nn.ModuleDict(OrderedDict((n, getattr(resnet, n)) for n in stages))

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], padding_mask [B, H, W] -> features [B, C, h, w], mask [B, h, w]."""
        x = images
        for module in self.body.values():
            x = module(x)
        mask = F.interpolate(padding_mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return x, mask


class SinePositionEncoding(nn.Module):
    """Normalized 2-D sine encoding over the valid area (y channels first, then x)."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B, h, w] bool (True = padding) -> [B, 2 * num_pos_feats, h, w] float32."""
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * self.scale
        x = x / (x[:, :, -1:] + eps) * self.scale
        idx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        freqs = self.temperature ** (2 * (idx // 2) / self.num_pos_feats)
        pos_x = x[:, :, :, None] / freqs
        pos_y = y[:, :, :, None] / freqs
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class BackboneWithPosition(nn.Sequential):
    """``[0]`` is the trunk, ``[1]`` the position encoding (hence ``backbone.0.body.*``)."""

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> features [B, C, h, w], mask [B, h, w], pos [B, E, h, w] in the features' dtype."""
        features, mask = self[0](images, padding_mask)
        return features, mask, self[1](mask).to(features.dtype)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; activations are sequence-first [HW, B, E]."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, cross-attention, FFN; [Q, B, E]."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, tgt: Tensor, memory: Tensor, key_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt)[0]))
        cross = self.multihead_attn(
            query=tgt + query_pos,
            key=memory + pos,  # recomputed in every layer, as in the original
            value=memory,
            key_padding_mask=key_padding_mask,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(cross))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, memory: Tensor, key_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        """-> [num_layers, Q, B, E]: every layer's output after the final norm."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, key_padding_mask, pos, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers
        )
        self.decoder = Decoder(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model
        )
        self.d_model = d_model

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """src, pos [B, E, h, w]; mask [B, h, w]; query_embed [Q, E] -> [L, B, Q, E]."""
        batch = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # [HW, B, E]
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)  # [Q, B, E]
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, mask, pos, query_pos).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class OfficialDETR(nn.Module):
    """DETR with the original module structure and parameter names.

    ``forward(images [B, 3, H, W], padding_mask [B, H, W])`` returns ``pred_logits``
    [B, Q, num_classes + 1] and ``pred_boxes`` [B, Q, 4] (cxcywh in [0, 1]).
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        dilation: bool = False,
        num_classes: int = 91,
        num_queries: int = 100,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = BackboneWithPosition(
            ResNetTrunk(backbone, dilation), SinePositionEncoding(hidden_dim // 2)
        )
        num_channels = 512 if backbone in ("resnet18", "resnet34") else 2048
        self.transformer = Transformer(
            hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout
        )
        self.input_proj = nn.Conv2d(num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)

    def forward(self, images: Tensor, padding_mask: Tensor) -> dict[str, Tensor]:
        features, mask, pos = self.backbone(images, padding_mask)
        hidden = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)
        return {
            "pred_logits": self.class_embed(hidden)[-1],
            "pred_boxes": self.bbox_embed(hidden).sigmoid()[-1],
        }


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A ``detr_lightning`` DETR's state dict in the official layout (``backbone.0.*``)."""
    return {
        ("backbone.0." + key[len("backbone.") :] if key.startswith("backbone.") else key): value
        for key, value in model.state_dict().items()
    }


def official_reference_for(model: nn.Module) -> OfficialDETR:
    """Build the reference with ``model``'s architecture and load its weights (strict).

    ``model`` is a ``detr_lightning`` DETR with a sine position encoding and post-norm layers;
    call this before any in-place change of its structure (``fuse_frozen_batchnorm``).
    """
    transformer = model.transformer
    encoder_layers = list(transformer.encoder.layers)
    decoder_layers = list(transformer.decoder.layers)
    if any(layer.pre_norm for layer in encoder_layers + decoder_layers):
        raise ValueError("the official reference is post-norm; build the model with pre_norm=False")
    first = decoder_layers[0]
    reference = OfficialDETR(
        backbone=model.backbone.name,
        dilation=model.backbone.dilation,
        num_classes=model.num_classes,
        num_queries=model.num_queries,
        hidden_dim=transformer.hidden_dim,
        nheads=transformer.nheads,
        enc_layers=len(encoder_layers),
        dec_layers=len(decoder_layers),
        dim_feedforward=first.linear1.out_features,
        dropout=first.dropout.p,
    )
    reference.load_state_dict(official_state_dict(model), strict=True)
    return reference.train(model.training)
