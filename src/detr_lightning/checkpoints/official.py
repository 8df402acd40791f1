"""The official DETR checkpoints' key names (``backbone.0.body.*``, ``detr.`` for panoptic)
-> ours."""

from __future__ import annotations

from torch import Tensor


def from_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Official key names -> ours. Returns the converted dict and the keys left out."""
    converted, skipped = {}, []
    for key, value in state.items():
        if key.startswith("detr."):  # panoptic checkpoints wrap the detector
            key = key[len("detr.") :]
        elif key.startswith(("bbox_attention.", "mask_head.")):
            skipped.append(key)
            continue
        if key.startswith("backbone.0."):
            key = key[len("backbone.0.") :]
            key = "backbone." + key
        elif key.startswith("backbone.1."):
            key = "position_encoding." + key[len("backbone.1.") :]
        converted[key] = value
    return converted, skipped
