"""Attention maps of a DETR model, as in the paper's Fig. 3 and Fig. 6 (Carion et al., 2020).

Our :class:`~detr_lightning.models.transformer.MultiheadAttention` runs on
``scaled_dot_product_attention`` and never materializes its weights, so they are recomputed
here from the very inputs the layers received (captured by temporary forward hooks) and the
layers' own q/k projections: ``softmax(q k^T / sqrt(d_head))`` with ``-inf`` on padding keys.

- Fig. 6: cross-attention of the last decoder layer, one map per object query over the
  encoder's feature grid. The paper shows single heads; here the heads are averaged.
- Fig. 3: self-attention of the last encoder layer, one map per reference point.

The figures themselves are :mod:`detr_lightning.viz.attention_figures`'.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..data.images import read_image
from ..models.transformer import KeyPadding, MultiheadAttention
from .predictor import Predictor

__all__ = [
    "AttentionMaps",
    "DetectionAttention",
    "attention_weights",
    "capture_attention",
    "detect_with_attention",
]


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
            query, key, mask = named["query"], named["key"], named.get("key_padding_mask")
            if isinstance(mask, KeyPadding):
                mask = mask.mask
            if query.dim() == 2:  # the layers' flattened [B * L, E]
                batch = named["batch"]
                query, key = (
                    query.view(batch, -1, query.shape[-1]),
                    key.view(batch, -1, key.shape[-1]),
                )
            calls[name] = (query, key, mask)

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
    predictor: Predictor,
    image: str | os.PathLike | Image.Image | Tensor,
    *,
    threshold: float = 0.7,
) -> DetectionAttention:
    """Detect objects in one image exactly as evaluation does, keeping the attention maps.

    ``image`` is anything :func:`~detr_lightning.data.images.read_image` accepts. A detection is
    a query whose best class (softmax, "no object" excluded) scores > ``threshold`` and whose
    label has a category (labels with category id -1 are skipped). The model runs in eval
    mode and is put back in its previous mode afterwards.
    """
    original = read_image(image)
    inputs = predictor.transform(original)
    model = predictor.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        maps = capture_attention(model, inputs[None].to(device))
    finally:
        model.train(was_training)

    detections = predictor.select(
        maps.outputs["pred_logits"][0].float().cpu(),
        maps.outputs["pred_boxes"][0].float().cpu(),
        (int(original.shape[1]), int(original.shape[2])),
        threshold=threshold,
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
