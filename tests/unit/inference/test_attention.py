"""Attention maps: weights that reproduce the layers' outputs, masks, hooks, and the
detections they come with."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detr_lightning.data.images import inference_transform, read_image
from detr_lightning.inference.attention import (
    AttentionMaps,
    attention_weights,
    capture_attention,
    detect_with_attention,
)
from detr_lightning.models import DETR, PositionEmbeddingSine, Transformer
from detr_lightning.models.transformer import KeyPadding
from detr_lightning.ops.padding import pad_images
from helpers.data import write_street_image
from helpers.models import NUM_CLASSES, NUM_QUERIES, PatchBackbone, confident_module
from helpers.models import tiny_detr as tiny_model


def tiny_detr(**overrides) -> DETR:
    return tiny_model(**overrides).eval()


@pytest.fixture(scope="module")
def model() -> DETR:
    """The default tiny model, shared: capture_attention leaves it as it was."""
    torch.manual_seed(0)
    return tiny_detr()


def padded_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes, each padded in one direction: [2, 3, 160, 224]."""
    return pad_images([torch.randn(3, 96, 224), torch.randn(3, 160, 100)])


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Recorder:
    """Records the inputs and output of a MultiheadAttention call (the test's own hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output) -> None:
        names = ("query", "key", "value", "key_padding_mask")
        inputs = {**dict(zip(names, args)), **kwargs}
        batch = inputs.pop("batch", None)
        if batch is not None:  # the layers' flattened [B * L, E]: back to [B, L, E]
            for name in ("query", "key", "value"):
                inputs[name] = inputs[name].view(batch, -1, inputs[name].shape[-1])
            output = output.view(batch, -1, output.shape[-1])
        if isinstance(inputs.get("key_padding_mask"), KeyPadding):
            inputs["key_padding_mask"] = inputs["key_padding_mask"].mask
        self.inputs, self.output = inputs, output


def reference_attention(attn: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own nn.MultiheadAttention with the same parameters: (output, weights per head)."""
    embed, heads = attn.embed_dim, attn.num_heads
    reference = nn.MultiheadAttention(embed, heads, batch_first=True).eval()
    reference.load_state_dict(attn.state_dict())
    return reference(
        inputs["query"],
        inputs["key"],
        inputs["value"],
        key_padding_mask=inputs.get("key_padding_mask"),
        need_weights=True,
        average_attn_weights=False,
    )


def output_from_weights(attn: nn.Module, weights: torch.Tensor, value: torch.Tensor):
    """out_proj(weights @ v): what the layer computes once its weights are known."""
    batch, len_k, embed = value.shape
    heads = attn.num_heads
    w_v, b_v = attn.in_proj_weight[2 * embed :], attn.in_proj_bias[2 * embed :]
    v = F.linear(value, w_v, b_v).view(batch, len_k, heads, embed // heads).transpose(1, 2)
    mixed = (weights @ v).transpose(1, 2).reshape(batch, weights.shape[2], embed)
    return attn.out_proj(mixed)


@pytest.mark.parametrize("pre_norm", [False, True])
@torch.no_grad()
def test_weights_reproduce_what_the_layers_returned(pre_norm: bool) -> None:
    model = tiny_detr(pre_norm=pre_norm)
    images, padding_mask = padded_pair()
    encoder_attn = model.transformer.encoder.layers[-1].self_attn
    decoder_attn = model.transformer.decoder.layers[-1].multihead_attn
    recorders = {"encoder": Recorder(encoder_attn), "decoder": Recorder(decoder_attn)}
    try:
        maps = capture_attention(model, images, padding_mask)
    finally:
        for recorder in recorders.values():
            recorder.handle.remove()
    batch, height, width = maps.feature_mask.shape
    assert maps.feature_mask.any()  # the padding reaches the feature grid: the mask matters

    for name, attn in (("encoder", encoder_attn), ("decoder", decoder_attn)):
        recorded = recorders[name].inputs
        mask = recorded["key_padding_mask"]
        weights = attention_weights(attn, recorded["query"], recorded["key"], mask)
        # (a) weights @ v through out_proj gives back the layer's real output
        rebuilt = output_from_weights(attn, weights, recorded["value"])
        torch.testing.assert_close(rebuilt, recorders[name].output, atol=1e-5, rtol=0)
        # ... which the same weights without the padding mask do not: the check has teeth
        unmasked = attention_weights(attn, recorded["query"], recorded["key"])
        assert (output_from_weights(attn, unmasked, recorded["value"]) - rebuilt).abs().max() > 1e-3
        # an independent reference: torch's nn.MultiheadAttention with the same parameters
        reference_output, reference_weights = reference_attention(attn, recorded)
        torch.testing.assert_close(weights, reference_weights, atol=1e-5, rtol=0)
        torch.testing.assert_close(reference_output, recorders[name].output, atol=1e-5, rtol=0)
        # the maps returned are exactly these weights, averaged over heads
        averaged = weights.mean(1)
        if name == "decoder":
            assert maps.decoder.shape == (batch, NUM_QUERIES, height, width)
            torch.testing.assert_close(maps.decoder.flatten(2), averaged, atol=1e-6, rtol=0)
        else:
            assert maps.encoder.shape == (batch, height, width, height, width)
            expected = averaged.view(batch, height, width, height, width)
            torch.testing.assert_close(maps.encoder, expected, atol=1e-6, rtol=0)


def test_per_head_and_averaged_weights_agree(model: DETR) -> None:
    attn = model.transformer.decoder.layers[-1].multihead_attn
    query, key = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    per_head = attention_weights(attn, query, key, mask)
    assert per_head.shape == (2, 4, 5, 9)
    torch.testing.assert_close(
        attention_weights(attn, query, key, mask, average_heads=True), per_head.mean(1)
    )
    assert (per_head[1, ..., 6:] == 0).all()
    # the heads differ, so averaging loses information (the per-head maps are available)
    assert (per_head[:, 0] - per_head[:, 1]).abs().max() > 1e-3


def assert_distributions(maps: AttentionMaps) -> None:
    """Every map is 0 on padding cells and sums to 1 over the valid ones."""
    for index, padding in enumerate(maps.feature_mask):
        decoder = maps.decoder[index]
        assert (decoder[:, padding] == 0).all()
        torch.testing.assert_close(decoder.sum((1, 2)), torch.ones(decoder.shape[0]))
        assert (decoder[:, ~padding] > 0).all()
        encoder = maps.encoder[index]
        assert (encoder[..., padding] == 0).all()
        torch.testing.assert_close(encoder.sum((2, 3)), torch.ones(encoder.shape[:2]))


def test_padding_cells_get_nothing_and_maps_sum_to_one(model: DETR) -> None:
    images, padding_mask = padded_pair()
    maps = capture_attention(model, images, padding_mask)
    with torch.no_grad():
        features, expected_mask = model.backbone(images, padding_mask)
    assert torch.equal(maps.feature_mask, expected_mask)
    # image 0 is padded at the bottom, image 1 on the right
    assert maps.valid_size(0) == (3, 7) and maps.valid_size(1) == (5, 4)
    assert maps.feature_mask.shape[1:] == features.shape[-2:] == (5, 7)
    assert_distributions(maps)
    decoder, encoder = maps.crop(1)
    assert decoder.shape == (NUM_QUERIES, 5, 4) and encoder.shape == (5, 4, 5, 4)
    # cropping drops only padding: the cropped maps still sum to 1
    torch.testing.assert_close(decoder.sum((1, 2)), torch.ones(NUM_QUERIES))
    torch.testing.assert_close(encoder.sum((2, 3)), torch.ones(5, 4))


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (250, 70), (33, 300)])
def test_any_image_size(model: DETR, size: tuple[int, int]) -> None:
    images = torch.randn(1, 3, *size)
    maps = capture_attention(model, images)
    cells = (math.ceil(size[0] / 32), math.ceil(size[1] / 32))
    assert maps.decoder.shape == (1, NUM_QUERIES, *cells)
    assert maps.encoder.shape == (1, *cells, *cells)
    assert not maps.feature_mask.any()
    assert maps.valid_size(0) == cells
    assert_distributions(maps)


def test_batched_maps_equal_the_maps_of_each_image_alone() -> None:
    transformer = Transformer(32, 4, enc_layers=2, dec_layers=2, dim_feedforward=64)
    model = DETR(
        PatchBackbone(),
        transformer,
        NUM_CLASSES,
        NUM_QUERIES,
        position_embedding=PositionEmbeddingSine(16),
    ).eval()
    wide, tall = torch.randn(3, 64, 128), torch.randn(3, 128, 64)
    batched = capture_attention(model, *pad_images([wide, tall]))
    for index, image in enumerate((wide, tall)):
        alone = capture_attention(model, image[None])
        decoder, encoder = batched.crop(index)
        assert decoder.shape == alone.decoder[0].shape
        torch.testing.assert_close(decoder, alone.decoder[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(encoder, alone.encoder[0], atol=1e-5, rtol=1e-4)


def test_model_without_encoder_layers() -> None:
    maps = capture_attention(tiny_detr(enc_layers=0), *padded_pair())
    assert maps.encoder is None
    assert maps.decoder.shape == (2, NUM_QUERIES, 5, 7)
    assert maps.crop(0)[1] is None


def test_outputs_unchanged_and_no_hooks_left(model: DETR) -> None:
    images, padding_mask = padded_pair()
    assert hooks_left(model) == 0
    maps = capture_attention(model, images, padding_mask)
    assert hooks_left(model) == 0
    with torch.no_grad():
        expected = model(images, padding_mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(maps.outputs[key], expected[key])
    assert len(maps.outputs["aux_outputs"]) == len(expected["aux_outputs"]) == 1
    for got, want in zip(maps.outputs["aux_outputs"], expected["aux_outputs"]):
        assert all(torch.equal(got[key], want[key]) for key in want)


def test_hooks_are_removed_when_the_forward_pass_fails(model: DETR) -> None:
    with pytest.raises(RuntimeError):  # one channel: the first convolution fails
        capture_attention(model, torch.randn(1, 1, 64, 64))
    assert hooks_left(model) == 0


def test_training_mode_and_foreign_models_are_refused() -> None:
    with pytest.raises(ValueError, match="eval"):
        capture_attention(tiny_detr().train(), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="transformer"):
        capture_attention(nn.Conv2d(3, 3, 1).eval(), torch.randn(1, 3, 64, 64))


@pytest.fixture
def image_file(tmp_path):
    return write_street_image(tmp_path / "street.png")


def test_detections_match_evaluation_and_postprocess(image_file) -> None:
    module = confident_module(confident_label=1)
    original = read_image(image_file)
    inputs = inference_transform(module.hparams["data"])(original)
    assert inputs.shape[1:] == (128, 196)  # resized as evaluation does, not the 150 x 230 file
    with torch.no_grad():
        expected = module.model(inputs[None])
    scores = expected["pred_logits"][0].softmax(-1)[:, :-1].max(-1).values
    threshold = float(scores.median())  # keeps about half of the queries
    found = detect_with_attention(module.predictor(), image_file, threshold=threshold)
    assert torch.equal(found.image, original) and torch.equal(found.inputs, inputs)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(found.outputs[key], expected[key])

    # the same detections as the evaluation post-processing, in original image pixels
    reference = module.postprocess(expected, [(150, 230)])[0]
    keep = reference["scores"] > threshold
    order = reference["scores"][keep].argsort(descending=True)
    assert 0 < len(found.scores) < NUM_QUERIES
    torch.testing.assert_close(found.scores, reference["scores"][keep][order])
    torch.testing.assert_close(found.boxes, reference["boxes"][keep][order])
    assert found.labels.tolist() == [1] * len(found.scores)
    assert all(caption.startswith("dog ") for caption in found.captions)
    # each detection keeps its own query's map, cropped to the feature grid of the image
    maps = capture_attention(module.model, inputs[None])
    assert found.decoder.shape == (len(found.scores), 4, 7)
    assert torch.equal(found.decoder, maps.decoder[0, found.queries])
    assert torch.equal(found.encoder, maps.encoder[0])


def test_labels_without_category_are_not_detections(image_file) -> None:
    found = detect_with_attention(
        confident_module(confident_label=4).predictor(), image_file, threshold=0.3
    )
    assert len(found.captions) == 0 and found.boxes.shape == (0, 4)
    assert found.decoder.shape == (0, 4, 7)
    # while the same scores on a label with a category are detections
    found = detect_with_attention(
        confident_module(confident_label=2).predictor(), image_file, threshold=0.3
    )
    assert len(found.captions) == NUM_QUERIES
