"""The official DETR checkpoints' key names (``backbone.0.body.*``, ``detr.`` for panoptic)
-> ours."""

from __future__ import annotations

from torch import Tensor

from .panoptic import split_panoptic


def from_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Official key names -> ours: the detector's tensors, and a panoptic checkpoint's mask
    head (``bbox_attention.*``, ``mask_head.*``, the names our
    :class:`~detr_lightning.models.segmentation.DETRSegmentation` gives them; empty for a
    detection checkpoint)."""
    detector, head = split_panoptic(state)
    converted = {}
    for key, value in detector.items():
        if key.startswith("backbone.0."):
            key = "backbone." + key[len("backbone.0.") :]
        elif key.startswith("backbone.1."):
            key = "position_encoding." + key[len("backbone.1.") :]
        converted[key] = value
    return converted, head
