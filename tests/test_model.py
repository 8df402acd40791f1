"""DETR model: tiny-config shapes, padding invariance, backbone options, layers vs references."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from detr_lightning.inference.bf16 import bf16_inference_backbone, bf16_inference_copy
from detr_lightning.models import (
    DETR,
    Backbone,
    MultiheadAttention,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    Transformer,
    build_detr,
    fuse_frozen_batchnorm,
)
from detr_lightning.models.backbone import FrozenBatchNorm2d
from model_fixtures import (
    NUM_CLASSES,
    NUM_QUERIES,
    PatchBackbone,
    randomize_frozen_batchnorm,
    tiny_detr,
    tiny_eval_detr,
)


def assert_same_predictions(actual: dict, expected: dict, atol: float = 1e-4) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def model() -> DETR:
    return tiny_eval_detr()


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("dec_layers", [1, 3])
def test_output_shapes_and_aux_outputs(dec_layers: int) -> None:
    torch.manual_seed(0)
    detr = tiny_detr(dec_layers=dec_layers).eval()
    with torch.no_grad():
        out = detr(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert out["pred_boxes"].shape == (2, NUM_QUERIES, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
        assert aux["pred_boxes"].shape == (2, NUM_QUERIES, 4)


def test_no_aux_outputs_without_aux_loss() -> None:
    detr = tiny_detr(aux_loss=False, dec_layers=3).eval()
    with torch.no_grad():
        out = detr(torch.randn(1, 3, 64, 64))
    assert "aux_outputs" not in out


# --- padding ------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["sine", "learned"])
def test_padding_does_not_change_predictions(position: str) -> None:
    torch.manual_seed(1)
    transformer = Transformer(32, 4, enc_layers=2, dec_layers=2,
                              dim_feedforward=64)  # fmt: skip
    encoding = PositionEmbeddingSine(16) if position == "sine" else PositionEmbeddingLearned(16)
    detr = DETR(PatchBackbone(), transformer, NUM_CLASSES, NUM_QUERIES, position_embedding=encoding)
    detr.eval()
    wide, tall = torch.randn(3, 64, 128), torch.randn(3, 128, 64)  # each padded in one direction
    with torch.no_grad():
        batched = detr([wide, tall])
        alone = [detr([wide]), detr([tall])]
    for i, single in enumerate(alone):
        assert_same_predictions({k: batched[k][i : i + 1] for k in single}, single)
        for layer in range(len(single["aux_outputs"])):
            assert_same_predictions(
                {k: v[i : i + 1] for k, v in batched["aux_outputs"][layer].items()},
                single["aux_outputs"][layer],
            )


def test_unpadded_image_is_independent_of_its_batch(model: DETR) -> None:
    small, large = torch.randn(3, 64, 64), torch.randn(3, 96, 128)
    with torch.no_grad():
        batched = model([small, large])
        alone = model([large])
    assert_same_predictions({k: batched[k][1:] for k in alone}, alone)


def test_list_input_equals_padded_batch_with_mask(model: DETR) -> None:
    first, second = torch.randn(3, 64, 96), torch.randn(3, 96, 64)
    images = torch.zeros(2, 3, 96, 96)
    padding_mask = torch.ones(2, 96, 96, dtype=torch.bool)
    images[0, :, :64, :96] = first
    padding_mask[0, :64, :96] = False
    images[1, :, :96, :64] = second
    padding_mask[1, :96, :64] = False
    with torch.no_grad():
        from_list = model([first, second])
        from_batch = model(images, padding_mask)
    assert_same_predictions(from_list, from_batch, atol=1e-6)


def test_batch_without_mask_equals_all_valid_mask(model: DETR) -> None:
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        implicit = model(images)
        explicit = model(images, torch.zeros(2, 64, 64, dtype=torch.bool))
    assert_same_predictions(implicit, explicit, atol=1e-6)


def test_bad_inputs_rejected(model: DETR) -> None:
    with pytest.raises(ValueError, match="padding_mask"):
        model([torch.randn(3, 64, 64)], torch.zeros(1, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(3, 64, 64))


# --- backbone -----------------------------------------------------------------------------


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


def test_pre_norm_encoder_has_final_norm() -> None:
    pre = tiny_detr(pre_norm=True).eval()
    post = tiny_detr(pre_norm=False)
    assert isinstance(pre.transformer.encoder.norm, nn.LayerNorm)
    assert post.transformer.encoder.norm is None
    assert all(layer.pre_norm for layer in pre.transformer.encoder.layers)
    assert all(layer.pre_norm for layer in pre.transformer.decoder.layers)
    with torch.no_grad():
        out = pre(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out["pred_logits"]).all()


# --- position encodings -------------------------------------------------------------------


def test_sine_position_encoding_hand_computed() -> None:
    # Image 0 is 2x2 padded to 2x3 (last column); image 1 fills the 2x3 map.
    padding_mask = torch.tensor([[[0, 0, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    encoding = PositionEmbeddingSine(num_pos_feats=4, temperature=10000.0, normalize=True)
    pos = encoding(padding_mask)
    assert pos.shape == (2, 8, 2, 3) and pos.dtype == torch.float32

    eps, two_pi = 1e-6, 2 * math.pi
    frequencies = [1.0, 1.0, 100.0, 100.0]  # 10000 ** (2 * (k // 2) / 4)
    for image, valid_width in ((0, 2), (1, 3)):
        for row in range(2):
            for col in range(3):
                valid_column = col < valid_width
                y = (row + 1) if valid_column else 0  # valid pixels above, inclusive
                y_total = 2 if valid_column else 0
                x = min(col + 1, valid_width)  # valid pixels to the left, inclusive
                y_norm = y / (y_total + eps) * two_pi
                x_norm = x / (valid_width + eps) * two_pi
                expected = []
                for value in (y_norm, x_norm):
                    for k, frequency in enumerate(frequencies):
                        angle = value / frequency
                        expected.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
                torch.testing.assert_close(
                    pos[image, :, row, col], torch.tensor(expected), atol=1e-5, rtol=0
                )


def test_sine_position_encoding_ignores_padding() -> None:
    encoding = PositionEmbeddingSine(num_pos_feats=8)
    alone = encoding(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(1, 5, 7, dtype=torch.bool)
    padded_mask[0, :3, :4] = False
    padded = encoding(padded_mask)
    torch.testing.assert_close(padded[..., :3, :4], alone)


def test_sine_scale_requires_normalize() -> None:
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(normalize=False, scale=1.0)


def test_learned_position_encoding_shape_and_limit() -> None:
    encoding = PositionEmbeddingLearned(num_pos_feats=6, max_size=5)
    pos = encoding(torch.zeros(2, 3, 4, dtype=torch.bool))
    assert pos.shape == (2, 12, 3, 4)
    # x (column) embedding first, then y (row).
    torch.testing.assert_close(pos[0, :6, 1, 2], encoding.col_embed.weight[2])
    torch.testing.assert_close(pos[1, 6:, 1, 2], encoding.row_embed.weight[1])
    with pytest.raises(ValueError, match="6x4"):
        encoding(torch.zeros(1, 6, 4, dtype=torch.bool))


# --- attention ----------------------------------------------------------------------------


def copied_torch_attention(ours: MultiheadAttention) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(ours.embed_dim, ours.num_heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.in_proj_weight)
        reference.in_proj_bias.copy_(ours.in_proj_bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    return reference.eval()


@pytest.mark.parametrize("self_attention", [True, False])
def test_multihead_attention_matches_torch(self_attention: bool) -> None:
    torch.manual_seed(2)
    ours = MultiheadAttention(32, 4).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    reference = copied_torch_attention(ours)
    query = torch.randn(3, 9, 32)
    key = query if self_attention else torch.randn(3, 11, 32)
    value = torch.randn(3, key.shape[1], 32)
    key_padding_mask = torch.zeros(3, key.shape[1], dtype=torch.bool)
    key_padding_mask[0, -4:] = True
    key_padding_mask[2, 1::2] = True
    with torch.no_grad():
        actual = ours(query, key, value, key_padding_mask)
        expected, _ = reference(query, key, value, key_padding_mask=key_padding_mask)
        actual_unmasked = ours(query, key, value)
        expected_unmasked, _ = reference(query, key, value)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_unmasked, expected_unmasked, atol=1e-5, rtol=1e-5)


def test_multihead_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(30, 4)


# --- inference conversions ----------------------------------------------------------------


def test_fuse_frozen_batchnorm_keeps_outputs(model: DETR) -> None:
    fused = fuse_frozen_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    assert all(m.bias is not None for m in fused.backbone.modules() if isinstance(m, nn.Conv2d))
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64)]
    with torch.no_grad():
        assert_same_predictions(fused(images), model(images))


@torch.no_grad()
def badly_scaled_resnet50(dilation: bool) -> tuple[Backbone, torch.Generator]:
    """A seeded random ResNet-50 backbone in eval mode whose frozen BN statistics are drawn
    badly scaled (variances down to 0.01), and the generator that drew them, for the inputs."""
    torch.manual_seed(0)
    backbone = Backbone("resnet50", dilation=dilation).eval()
    generator = torch.Generator().manual_seed(1)
    for name, buffer in backbone.named_buffers():
        if name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.99 + 0.01)
        elif name.endswith(("running_mean", "bias")):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return backbone, generator


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


def test_channels_last_gives_same_outputs(model: DETR) -> None:
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert channels_last.channels_last and not model.channels_last
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert_same_predictions(channels_last(images), model(images))


def test_images_reach_the_backbone_in_the_models_memory_format(model: DETR) -> None:
    """A 1x1 weight (input_proj's) is contiguous in both layouts; it must not turn the images
    of a model left in the default layout to channels_last."""
    layouts = []

    def record(module, args):
        layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    images = torch.randn(2, 3, 64, 96)
    for candidate in (model, copy.deepcopy(model).to(memory_format=torch.channels_last)):
        handle = candidate.backbone.register_forward_pre_hook(record)
        with torch.no_grad():
            candidate(images)
        handle.remove()
    assert layouts == [False, True]


# --- full-size models ---------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "low", "high"), [("resnet50", 41.0e6, 42.0e6),
                                                       ("resnet101", 60.0e6, 61.0e6)])  # fmt: skip
def test_parameter_count_matches_paper(backbone: str, low: float, high: float) -> None:
    # Table 1 of the paper: DETR 41M, DETR-R101 60M parameters.
    with torch.device("meta"):
        detr = build_detr(num_classes=91, backbone=backbone)
    assert low <= sum(p.numel() for p in detr.parameters()) <= high


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


def test_heads_run_in_fp32_under_bf16_autocast() -> None:
    """Under bf16 autocast the class and box heads (and the sigmoid) still compute in fp32:
    the outputs are fp32 and the boxes stay within 5e-3 of the fp32 model's."""
    generator = torch.Generator().manual_seed(4)
    model = tiny_detr().eval()
    randomize_frozen_batchnorm(model, generator)
    images = [
        torch.randn(3, 96, 128, generator=generator),
        torch.randn(3, 80, 112, generator=generator),
    ]
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
    for key in ("pred_logits", "pred_boxes"):
        assert mixed[key].dtype == torch.float32, key
        assert mixed["aux_outputs"][0][key].dtype == torch.float32, key
    deviation = (mixed["pred_boxes"] - reference["pred_boxes"]).abs().max().item()
    assert deviation <= 5e-3, deviation
    # the heads alone, fed the same hidden states in bf16, would round their outputs to bf16
    hidden = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.bbox_embed(hidden).dtype == torch.bfloat16  # what the fp32 block prevents


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
