"""A copy of DETR for inference under bfloat16 autocast, with the backbone's per-call weight
work done once."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.backbone import Backbone, fuse_frozen_batchnorm
from ..models.detr import DETR


@torch.no_grad()
def bf16_inference_backbone(backbone: Backbone) -> Backbone:
    """A copy of ``backbone`` for inference under bfloat16 autocast, its per-call weight work
    done once: each frozen BatchNorm folded into its convolution and the convolutions' weights
    and biases stored in bfloat16.

    Under autocast the backbone folds every frozen BN into its conv at every call (in float32,
    see :func:`conv_norm`) and autocast then casts the folded weights to bfloat16: three passes
    over the trunk's weights (ResNet-101: 42M) per call, about 7% of a bf16 ResNet-101
    inference at 800x1066 on a 16-core AMX CPU. The copy holds the result of that work. It
    folds with the same float32 arithmetic and rounds to bfloat16 as autocast does, so under
    CPU bfloat16 autocast it returns exactly what ``backbone`` returns there. Without autocast
    its bfloat16 weights do not take float32 images: it is for autocast only. The original is
    left as it is (the copy costs its float32 weights for a moment, then half of them).
    """
    clone = copy.deepcopy(backbone).eval()
    trunk = getattr(clone, "body", clone)  # the ResNet; any other backbone module as a whole
    fuse_frozen_batchnorm(trunk)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            module.to(torch.bfloat16)
    return clone.requires_grad_(False)


def bf16_inference_copy(model: DETR) -> DETR:
    """``model`` for inference under bfloat16 autocast, with the backbone's per-call weight
    work done once (see :func:`bf16_inference_backbone`).

    The copy shares every module but the backbone with ``model``, so it costs the backbone's
    weights once more in bfloat16 (ResNet-50: 47 MB). On the CPU it returns exactly what
    ``model`` returns under ``torch.autocast("cpu", dtype=torch.bfloat16)``; called without
    autocast it raises. Build it after the weights are final: it does not follow later changes
    of ``model``'s backbone. ``predict(..., bf16=True)`` uses one from the second batch of a
    call on.
    """
    # every submodule is memoized to itself: shared, not copied; the backbone is replaced
    clone = copy.deepcopy(model, {id(module): module for module in model.children()})
    clone.backbone = bf16_inference_backbone(model.backbone)
    return clone.eval()
