"""Panoptic checkpoints: the detector wrapped as ``detr.*`` beside the mask head's
``bbox_attention.*`` and ``mask_head.*`` (the official files, and Hugging Face's
``DetrForSegmentation`` as ``save_pretrained`` writes it), split into the two parts."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

HEAD_PREFIXES = ("bbox_attention.", "mask_head.")

# transformers 5's in-memory names of the head (``torch.save(model.state_dict())``) -> the
# official ones, which its save_pretrained files keep
_HF_HEAD_NAMES = (
    (r"^mask_head\.conv([12])\.conv\.", r"mask_head.lay\1."),
    (r"^mask_head\.conv([12])\.norm\.", r"mask_head.gn\1."),
    (r"^mask_head\.fpn_stages\.0\.fpn_adapter\.", "mask_head.adapter1."),
    (r"^mask_head\.fpn_stages\.1\.fpn_adapter\.", "mask_head.adapter2."),
    (r"^mask_head\.fpn_stages\.2\.fpn_adapter\.", "mask_head.adapter3."),
    (r"^mask_head\.fpn_stages\.0\.refine\.conv\.", "mask_head.lay3."),
    (r"^mask_head\.fpn_stages\.1\.refine\.conv\.", "mask_head.lay4."),
    (r"^mask_head\.fpn_stages\.2\.refine\.conv\.", "mask_head.lay5."),
    (r"^mask_head\.fpn_stages\.0\.refine\.norm\.", "mask_head.gn3."),
    (r"^mask_head\.fpn_stages\.1\.refine\.norm\.", "mask_head.gn4."),
    (r"^mask_head\.fpn_stages\.2\.refine\.norm\.", "mask_head.gn5."),
    (r"^mask_head\.output_conv\.", "mask_head.out_lay."),
    (r"^bbox_attention\.([qk])_proj\.", r"bbox_attention.\1_linear."),
)


def is_panoptic(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict (any supported layout) holds a mask head."""
    return any(key.startswith(HEAD_PREFIXES) for key in state)


def split_panoptic(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the detector's tensors with the ``detr.`` prefix removed, in the file's own layout;
    the mask head's under the official names) of a panoptic state dict. A detection state
    dict comes back whole, with an empty head."""
    detector: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    wrapped = is_panoptic(state)
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES):
            for pattern, replacement in _HF_HEAD_NAMES:
                key = re.sub(pattern, replacement, key)
            head[key] = value
        elif wrapped and key.startswith("detr."):
            detector[key[len("detr.") :]] = value
        else:
            detector[key] = value
    return detector, head
