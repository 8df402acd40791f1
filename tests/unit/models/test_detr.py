"""The DETR model: output shapes, padding and batch invariance of its predictions, input
checks, memory format, fp32 heads, the paper's parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch

from detr_lightning.models import (
    DETR,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    Transformer,
    build_detr,
)
from helpers.models import (
    NUM_CLASSES,
    NUM_QUERIES,
    PatchBackbone,
    assert_same_predictions,
    randomize_frozen_batchnorm,
    tiny_detr,
    tiny_eval_detr,
)


@pytest.fixture(scope="module")
def model() -> DETR:
    return tiny_eval_detr()


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


@pytest.mark.parametrize(("backbone", "low", "high"), [("resnet50", 41.0e6, 42.0e6),
                                                       ("resnet101", 60.0e6, 61.0e6)])  # fmt: skip
def test_parameter_count_matches_paper(backbone: str, low: float, high: float) -> None:
    # Table 1 of the paper: DETR 41M, DETR-R101 60M parameters.
    with torch.device("meta"):
        detr = build_detr(num_classes=91, backbone=backbone)
    assert low <= sum(p.numel() for p in detr.parameters()) <= high


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
