"""The ResNet backbone: mask resolution, DC5, argument checks, trainable stages, norms, and
the frozen BatchNorm folded into the convolutions."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from detr_lightning.models import DETR, Backbone, fuse_frozen_batchnorm
from detr_lightning.models.backbone import FrozenBatchNorm2d
from helpers.models import (
    NUM_CLASSES,
    NUM_QUERIES,
    assert_same_predictions,
    badly_scaled_resnet50,
    tiny_detr,
    tiny_eval_detr,
)


@pytest.fixture(scope="module")
def model() -> DETR:
    return tiny_eval_detr()


def test_backbone_mask_follows_feature_resolution() -> None:
    backbone = Backbone("resnet18").eval()
    images = torch.randn(2, 3, 128, 96)
    padding_mask = torch.zeros(2, 128, 96, dtype=torch.bool)
    padding_mask[0, 64:] = True  # image 0 is 64x96
    with torch.no_grad():
        features, mask = backbone(images, padding_mask)
    assert features.shape == (2, 512, 4, 3)  # stride 32
    expected = torch.zeros(2, 4, 3, dtype=torch.bool)
    expected[0, 2:] = True
    assert torch.equal(mask, expected)


def test_dc5_halves_the_output_stride() -> None:
    with torch.device("meta"):  # shapes only: no compute for ResNet-50
        plain, dilated = Backbone("resnet50"), Backbone("resnet50", dilation=True)
        images = torch.empty(1, 3, 128, 192)
        padding_mask = torch.zeros(1, 128, 192, dtype=torch.bool)
        plain_features, plain_mask = plain(images, padding_mask)
        dilated_features, dilated_mask = dilated(images, padding_mask)
    assert (plain.stride, dilated.stride) == (32, 16)
    assert plain_features.shape == (1, 2048, 4, 6)
    assert dilated_features.shape == (1, 2048, 8, 12)
    assert dilated_mask.shape == (1, 8, 12) and plain_mask.shape == (1, 4, 6)


def test_backbone_arguments_validated() -> None:
    with pytest.raises(ValueError, match="DC5"):
        Backbone("resnet18", dilation=True)
    with pytest.raises(ValueError, match="unknown backbone"):
        Backbone("resnet27")
    with pytest.raises(ValueError, match="norm"):
        Backbone("resnet18", norm="layer")


@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_stem_and_layer1_frozen_layer2_to_4_trained(norm: str) -> None:
    backbone = Backbone("resnet18", norm=norm)
    stages = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    seen = set()
    for name, param in backbone.body.named_parameters():
        stage = name.split(".")[0]
        seen.add(stage)
        assert param.requires_grad == (stage in {"layer2", "layer3", "layer4"}), name
    assert seen == (stages if norm == "batch" else stages - {"bn1"})


def test_a_zero_backbone_lr_freezes_the_whole_backbone() -> None:
    detr = tiny_detr(lr=0.0, norm="batch")
    assert not any(p.requires_grad for p in detr.backbone.parameters())
    others = [p for n, p in detr.named_parameters() if not n.startswith("backbone.")]
    assert others and all(p.requires_grad for p in others)


@pytest.mark.parametrize(
    ("norm", "norm_type"), [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm)]
)
def test_batch_and_group_norm_backbones_run(norm: str, norm_type: type) -> None:
    detr = tiny_detr(norm=norm).eval()
    modules = list(detr.backbone.modules())
    assert any(isinstance(m, norm_type) for m in modules)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    with torch.no_grad():
        out = detr([torch.randn(3, 64, 96), torch.randn(3, 64, 64)])
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    # the model pickles (ddp_spawn sends it to its ranks that way) and computes the same
    copied = pickle.loads(pickle.dumps(detr))
    images = [torch.randn(3, 64, 96)]
    with torch.no_grad():
        torch.testing.assert_close(copied(images)["pred_boxes"], detr(images)["pred_boxes"])


def test_fuse_frozen_batchnorm_keeps_outputs(model: DETR) -> None:
    fused = fuse_frozen_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    assert all(m.bias is not None for m in fused.backbone.modules() if isinstance(m, nn.Conv2d))
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64)]
    with torch.no_grad():
        assert_same_predictions(fused(images), model(images))


@pytest.mark.parametrize("dilation", [False, True], ids=["r50", "r50-dc5"])
def test_folded_frozen_batchnorm_is_as_accurate_as_separate_norms(dilation: bool) -> None:
    """The backbone folds frozen BN into its convs (forward and backward). Against a float64
    run of the same function, folded and separate float32 norms err alike, DC5 included. With
    badly scaled random statistics a random ResNet's features grow to ~1e9 and both float32
    paths drift apart in absolute terms by the same relative ~1e-6: that is float32, not the
    folding."""
    import detr_lightning.models.backbone as backbone_module

    backbone, generator = badly_scaled_resnet50(dilation)
    images = torch.randn(2, 3, 64, 80, generator=generator)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    with torch.no_grad():
        exact = copy.deepcopy(backbone).double()(images.double(), mask)[0]
        folded = backbone(images, mask)[0]
        separate_norm = lambda x, conv, norm: norm(conv(x))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backbone_module, "conv_norm", separate_norm)
            separate = backbone(images, mask)[0]
    scale = exact.abs().max()
    folded_error = ((folded.double() - exact).abs().max() / scale).item()
    separate_error = ((separate.double() - exact).abs().max() / scale).item()
    assert folded_error < 2e-5 and separate_error < 2e-5
    assert folded_error < 10 * separate_error


def test_folded_frozen_batchnorm_trains_the_conv_weights() -> None:
    torch.manual_seed(0)
    backbone = Backbone("resnet18", trainable_layers=5)
    features, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    features.square().mean().backward()
    conv = backbone.body.layer1[0].conv1
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in backbone.buffers())


def test_three_stage_backbone_has_stride_16():
    backbone = Backbone("resnet18", num_stages=3)
    assert not hasattr(backbone.body, "layer4")
    assert (backbone.num_channels, backbone.stride) == (256, 16)
    features, mask = backbone(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
    assert features.shape == (1, 256, 6, 8) and mask.shape == (1, 6, 8)
    with pytest.raises(ValueError, match="num_stages"):
        Backbone("resnet50", num_stages=2)
    with pytest.raises(ValueError, match="DC5"):
        Backbone("resnet50", num_stages=3, dilation=True)


def test_frozen_batchnorm_follows_changes_of_its_buffers() -> None:
    """The scale and shift kept between forward passes are computed afresh whenever a
    buffer changes: written in place, loaded, or converted; the result stays that of
    torchvision's FrozenBatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d as Reference

    torch.manual_seed(0)
    ours, reference = FrozenBatchNorm2d(4), Reference(4)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours(x), reference(x))
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = torch.rand(4) + 0.5
        getattr(ours, name).copy_(value)
        getattr(reference, name).copy_(value)
        torch.testing.assert_close(ours(x), reference(x), msg=name)
    state = {k: torch.rand(4) + 0.5 for k in ("weight", "bias", "running_mean", "running_var")}
    ours.load_state_dict(state)
    reference.load_state_dict(state, strict=False)
    torch.testing.assert_close(ours(x), reference(x))
    ours.double()  # converted: computed in float64 now
    result = ours(x.double())
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, reference.double()(x.double()))


def test_frozen_stages_keep_their_folded_weights_until_the_weights_change() -> None:
    model = tiny_detr()
    body = model.backbone.body
    conv, norm = body.conv1, body.bn1
    assert not conv.weight.requires_grad  # the stem is frozen
    first = norm.fold_into(conv.weight)
    assert norm.fold_into(conv.weight) is first  # kept
    with torch.no_grad():
        conv.weight.mul_(2)
    torch.testing.assert_close(norm.fold_into(conv.weight), 2 * first)


def test_frozen_batchnorm_of_inference_tensors() -> None:
    """Buffers made under torch.inference_mode count no writes: nothing is kept, every call
    computes the norm afresh."""
    with torch.inference_mode():
        norm = FrozenBatchNorm2d(3)
        x = torch.randn(1, 3, 2, 2)
        first = norm(x)
        norm.running_var.fill_(4.0)
        torch.testing.assert_close(norm(x), first / (4.0 + 1e-5) ** 0.5 * (1 + 1e-5) ** 0.5)
