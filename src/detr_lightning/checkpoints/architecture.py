"""A DETR's architecture settings read off its state dict (our key names)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..utils.errors import CheckpointError
from .legacy import BACKBONE_TARGET, MODEL_TARGET


def _count_indexed(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of distinct N in keys ``{prefix}N.``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _infer_backbone(state: Mapping[str, Tensor], path: Path) -> str:
    blocks = _count_indexed(state, "backbone.body.layer3.")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    names = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18"}
    names[(False, 6)] = "resnet34"
    if (bottleneck, blocks) not in names:
        raise CheckpointError(
            f"{path}: cannot tell the ResNet depth from the weights (layer3 has {blocks} blocks, "
            f"bottleneck={bottleneck}); supported: resnet18/34/50/101"
        )
    return names[(bottleneck, blocks)]


def infer_model_config(state: Mapping[str, Tensor], path: Path) -> dict[str, Any]:
    """The ``model`` spec of the architecture that our state dict holds: the settings its
    weights reveal (DC5 dilation, the head count and dropout leave no trace; they keep the
    defaults unless the caller knows them from elsewhere)."""
    for key in ("query_embed.weight", "class_embed.weight", "transformer.decoder.norm.weight"):
        if key not in state:
            raise CheckpointError(f"{path}: no {key!r}; this is not a DETR detection checkpoint")
    backbone = {"_target_": BACKBONE_TARGET, "name": _infer_backbone(state, path)}
    if "backbone.body.layer4.0.conv1.weight" not in state:
        backbone["num_stages"] = 3
    return {
        "_target_": MODEL_TARGET,
        "backbone": backbone,
        "num_classes": state["class_embed.weight"].shape[0] - 1,
        "num_queries": state["query_embed.weight"].shape[0],
        "hidden_dim": state["query_embed.weight"].shape[1],
        "enc_layers": _count_indexed(state, "transformer.encoder.layers."),
        "dec_layers": _count_indexed(state, "transformer.decoder.layers."),
        "dim_feedforward": state["transformer.decoder.layers.0.linear1.weight"].shape[0],
        "pre_norm": "transformer.encoder.norm.weight" in state,
        "position_embedding": "learned"
        if "position_encoding.row_embed.weight" in state
        else "sine",
    }
