"""The bf16 inference copy returns what bfloat16 autocast returns."""

from __future__ import annotations

import pytest
import torch

from detr_lightning.inference.bf16 import bf16_inference_backbone, bf16_inference_copy
from detr_lightning.models.backbone import FrozenBatchNorm2d
from helpers.models import badly_scaled_resnet50, tiny_eval_detr


def test_bf16_inference_copy_returns_what_autocast_returns() -> None:
    """The copy folds and casts once what autocast folds and casts at every call: the same
    outputs bit for bit under CPU bf16 autocast, the original model untouched, every module
    but the backbone shared."""
    model = tiny_eval_detr()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    prepared = bf16_inference_copy(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(images), prepared(images)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(actual[key], expected[key]), key
        assert torch.equal(actual["aux_outputs"][0][key], expected["aux_outputs"][0][key]), key
    assert prepared.transformer is model.transformer and prepared.class_embed is model.class_embed
    assert prepared.backbone is not model.backbone
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in prepared.backbone.modules())
    assert prepared.backbone.body.conv1.weight.dtype == torch.bfloat16
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    with pytest.raises(RuntimeError), torch.no_grad():
        prepared(images)  # bf16 weights, fp32 images: for autocast only


def test_bf16_inference_backbone_keeps_a_dilated_resnet50_exact() -> None:
    """Bottleneck blocks, downsampling branches and DC5's dilation, with badly scaled random
    statistics: the folded bf16 copy returns what autocast returns from the original."""
    backbone, generator = badly_scaled_resnet50(dilation=True)
    images = torch.randn(1, 3, 64, 80, generator=generator)
    mask = torch.zeros(1, 64, 80, dtype=torch.bool)
    prepared = bf16_inference_backbone(backbone)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_mask = backbone(images, mask)
        actual, actual_mask = prepared(images, mask)
    assert actual.dtype == torch.bfloat16
    assert torch.equal(actual, expected) and torch.equal(actual_mask, expected_mask)
