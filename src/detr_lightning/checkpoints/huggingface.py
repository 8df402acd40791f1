"""Hugging Face DETR checkpoints (``DetrForObjectDetection``, as ``save_pretrained`` writes
them) -> our key names and model settings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.errors import CheckpointError

_HF_ENCODER = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}


_HF_DECODER = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "encoder_attn": "multihead_attn",
}


def from_huggingface(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Hugging Face DETR key names (as written by ``save_pretrained``) -> ours.

    q/k/v projections are packed into ``in_proj_weight``/``in_proj_bias`` (q rows, then k, v).
    In-memory names of transformers 5 (``o_proj``, ``mlp.fc1``, ``model.backbone.model``) are
    accepted too, for state dicts saved with ``torch.save(model.state_dict())``.
    """
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        renamed[key] = value

    converted: dict[str, Tensor] = {}
    packs: dict[str, dict[str, Tensor]] = {}
    for key, value in renamed.items():
        if key.startswith("model.backbone.conv_encoder.model."):
            converted["backbone.body." + key[len("model.backbone.conv_encoder.model.") :]] = value
            continue
        if key.startswith("model.backbone.position_embedding."):
            sub = key[len("model.backbone.position_embedding.") :]
            sub = sub.replace("row_embeddings", "row_embed").replace(
                "column_embeddings", "col_embed"
            )
            converted["position_encoding." + sub] = value
            continue
        simple = {
            "model.input_projection.": "input_proj.",
            "model.query_position_embeddings.": "query_embed.",
            "class_labels_classifier.": "class_embed.",
            "bbox_predictor.": "bbox_embed.",
            "model.decoder.layernorm.": "transformer.decoder.norm.",
        }
        prefix = next((p for p in simple if key.startswith(p)), None)
        if prefix is not None:
            converted[simple[prefix] + key[len(prefix) :]] = value
            continue
        match = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
        if match is None:
            raise CheckpointError(
                f"{path}: unexpected key {key!r} for a Hugging Face DETR checkpoint; only "
                "DetrForObjectDetection weights are supported"
            )
        part, index, rest = match.groups()
        base = f"transformer.{part}.layers.{index}."
        names = _HF_ENCODER if part == "encoder" else _HF_DECODER
        attn = re.match(r"(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$", rest)
        if attn is not None:
            module, which, kind = attn.groups()
            packs.setdefault(base + names.get(module, module) + "." + kind, {})[which] = value
            continue
        head, _, tail = rest.partition(".")
        if head in ("fc1", "fc2"):
            head = "linear" + head[-1]
        converted[base + names.get(head, head) + "." + tail] = value
    for key, parts in packs.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{path}: attention {key} lacks some of q/k/v projections")
        module, kind = key.rsplit(".", 1)
        converted[f"{module}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def hf_model_config(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Settings from a Hugging Face DetrConfig that the weights do not reveal (``model`` spec
    keys; the backbone's dilation under ``backbone_dilation``)."""
    backbone_config = config.get("backbone_config") or {}
    dilation = bool(config.get("dilation", False)) or backbone_config.get("output_stride") == 16
    settings: dict[str, Any] = {
        "backbone_dilation": dilation,
        "nheads": int(config.get("encoder_attention_heads", 8)),
        "dropout": float(config.get("dropout", 0.1)),
        "aux_loss": True,
    }
    if config.get("encoder_attention_heads") != config.get("decoder_attention_heads"):
        raise CheckpointError(
            f"{path}: encoder and decoder attention head counts differ; DETR uses one count"
        )
    return settings
