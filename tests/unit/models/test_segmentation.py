"""The panoptic model's mask head and its loss terms: shapes, the attention map against a
loop, the frozen detector, and the focal / dice terms against transformers' segmentation
loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.loss.loss_for_object_detection import ForSegmentationLoss

from detr_lightning.models import HungarianMatcher, SetCriterion
from detr_lightning.models.segmentation import AttentionMap, DETRSegmentation, MaskHead
from helpers.models import NUM_CLASSES, NUM_QUERIES, tiny_detr


def _images(generator, sizes=((64, 80), (48, 72))):
    images = torch.zeros(len(sizes), 3, *map(max, zip(*sizes)))
    padding = torch.ones(len(sizes), *images.shape[-2:], dtype=torch.bool)
    for i, (height, width) in enumerate(sizes):
        images[i, :, :height, :width] = torch.randn(3, height, width, generator=generator)
        padding[i, :height, :width] = False
    return images, padding


@pytest.mark.parametrize("num_stages", [3, 4])
def test_pred_masks_at_stride_four_beside_the_detector_outputs(num_stages):
    torch.manual_seed(0)
    detr = tiny_detr(num_stages=num_stages)
    model = DETRSegmentation(detr).eval()
    images, padding = _images(torch.Generator().manual_seed(1), ((66, 81), (48, 72)))
    with torch.no_grad():
        out = model(images, padding)
        alone = detr(images, padding)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 17, 21)  # ceil(66 / 4), ceil(81 / 4)
    assert torch.equal(out["pred_logits"], alone["pred_logits"])
    assert torch.equal(out["pred_boxes"], alone["pred_boxes"])
    assert len(out["aux_outputs"]) == 1


def test_attention_map_equals_a_loop_over_heads_and_positions():
    torch.manual_seed(0)
    attention = AttentionMap(16, 4)
    queries, keys = torch.randn(2, 3, 16), torch.randn(2, 16, 5, 6)
    padding = torch.zeros(2, 5, 6, dtype=torch.bool)
    padding[1, 3:, :] = True
    padding[1, :, 4:] = True
    weights = attention(queries, keys, padding)
    q = attention.q_linear(queries)  # [B, Q, E]
    k = torch.einsum("oc,bchw->bohw", attention.k_linear.weight, keys)
    k = k + attention.k_linear.bias[None, :, None, None]
    expected = torch.zeros(2, 3, 4, 5, 6)
    for b in range(2):
        for n in range(3):
            scores = torch.zeros(4, 5, 6)
            for head in range(4):
                channels = slice(4 * head, 4 * head + 4)
                for y in range(5):
                    for x in range(6):
                        dot = (q[b, n, channels] * k[b, channels, y, x]).sum() / 2.0  # sqrt(4)
                        scores[head, y, x] = float("-inf") if padding[b, y, x] else dot
            expected[b, n] = scores.flatten().softmax(0).view(4, 5, 6)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.flatten(2).sum(-1), torch.ones(2, 3))
    assert float(weights[1][..., 3:, :].detach().abs().max()) == 0.0


def test_mask_head_widths_are_the_official_ones():
    head = MaskHead(256, 8, [1024, 512, 256])
    layers = (head.lay1, head.lay2, head.lay3, head.lay4, head.lay5, head.out_lay)
    widths = [layer.out_channels for layer in layers]
    assert widths == [264, 128, 64, 32, 16, 1]
    assert [head.gn1.num_groups, head.gn5.num_groups] == [8, 8]
    assert [head.adapter1.in_channels, head.adapter3.in_channels] == [1024, 256]
    with pytest.raises(ValueError, match="too narrow"):
        MaskHead(8, 2, [256, 128, 64])


def test_frozen_detector_trains_the_head_only():
    torch.manual_seed(0)
    model = DETRSegmentation(tiny_detr(), freeze_detector=True).train()
    images, padding = _images(torch.Generator().manual_seed(2))
    out = model(images, padding)
    assert not out["pred_logits"].requires_grad  # no graph through the detector
    out["pred_masks"].square().mean().backward()
    assert all(p.grad is None for p in model.detr.parameters())
    head = list(model.bbox_attention.parameters()) + list(model.mask_head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert model.detr.training  # dropout stays on in the detector, as in the official recipe


def test_joint_training_reaches_the_detector():
    torch.manual_seed(0)
    model = DETRSegmentation(tiny_detr()).train()
    images, padding = _images(torch.Generator().manual_seed(2))
    model(images, padding)["pred_masks"].square().mean().backward()
    assert model.detr.input_proj.weight.grad.abs().sum() > 0
    assert model.detr.backbone.body.layer2[0].conv1.weight.grad.abs().sum() > 0


def test_batch_invariant_detector_is_refused():
    model = DETRSegmentation(tiny_detr(batch_invariant=True)).eval()
    images, padding = _images(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="batch_invariant"):
        model(images, padding)


def _segmentation_case(seed: int, sizes=(3, 0, 2)):
    generator = torch.Generator().manual_seed(seed)
    batch, queries = len(sizes), 6
    logits = torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator)
    centers = torch.rand(batch, queries, 2, generator=generator) * 0.6 + 0.2
    boxes = torch.cat([centers, torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.1], -1)
    masks = torch.randn(batch, queries, 9, 11, generator=generator) * 2
    image_sizes = [(36, 44), (30, 40), (33, 29)]
    targets = []
    for size, (height, width) in zip(sizes, image_sizes):
        target_centers = torch.rand(size, 2, generator=generator) * 0.6 + 0.2
        target_sides = torch.rand(size, 2, generator=generator) * 0.3 + 0.1
        targets.append({
            "labels": torch.randint(0, NUM_CLASSES, (size,), generator=generator),
            "boxes": torch.cat([target_centers, target_sides], -1),
            "masks": torch.rand(size, height, width, generator=generator) > 0.6,
        })  # fmt: skip
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}, targets


@pytest.mark.parametrize("seed", range(3))
def test_mask_terms_match_transformers(seed):
    outputs, targets = _segmentation_case(seed)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(), num_decoder_layers=1, masks=True,
                             mask_loss_coef=1.0, dice_loss_coef=1.0)  # fmt: skip
    ours = criterion(outputs, targets)
    config = SimpleNamespace(
        class_cost=1.0, bbox_cost=5.0, giou_cost=2.0, num_labels=NUM_CLASSES,
        eos_coefficient=0.1, auxiliary_loss=False, bbox_loss_coefficient=5.0,
        giou_loss_coefficient=2.0, mask_loss_coefficient=1.0, dice_loss_coefficient=1.0,
        decoder_layers=1,
    )  # fmt: skip
    labels = [
        {"class_labels": t["labels"], "boxes": t["boxes"], "masks": t["masks"].float()}
        for t in targets
    ]
    total, reference, _ = ForSegmentationLoss(
        outputs["pred_logits"], labels, "cpu", outputs["pred_boxes"], outputs["pred_masks"], config
    )
    assert reference["loss_mask"] > 0.01 and reference["loss_dice"] > 0.1
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert ours[key].item() == pytest.approx(reference[key].item(), abs=1e-5), key
    assert criterion.weighted_total(ours).item() == pytest.approx(total.item(), abs=1e-4)
    _, fused_total = criterion.losses_and_total(outputs, targets)
    assert fused_total.item() == pytest.approx(total.item(), abs=1e-4)


def test_mask_terms_hand_computed():
    """One image, one query, one 2 x 2 target: upsampling a constant logit map keeps it."""
    logits = torch.tensor([[[4.0, -4.0]]])  # one class, matched
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.5]]]),
               "pred_masks": torch.zeros(1, 1, 1, 1)}  # fmt: skip
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
              "masks": torch.tensor([[[True, False], [False, False]]])}  # fmt: skip
    losses = SetCriterion(1, HungarianMatcher(), num_decoder_layers=1, masks=True)(
        outputs, [target]
    )
    # p = sigmoid(0) = 0.5 everywhere: focal per pixel = 0.25 or 0.75 * ln 2 * 0.5^2
    expected_focal = (0.25 + 3 * 0.75) * torch.log(torch.tensor(2.0)) * 0.25 / 4
    assert losses["loss_mask"].item() == pytest.approx(expected_focal.item(), abs=1e-6)
    # dice: 1 - (2 * 0.5 + 1) / (2 + 1 + 1)
    assert losses["loss_dice"].item() == pytest.approx(0.5, abs=1e-6)


def test_masks_need_pred_masks_and_images_without_objects_work():
    outputs, targets = _segmentation_case(1, sizes=(0, 0, 0))
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(), num_decoder_layers=1, masks=True)
    losses = criterion(outputs, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert criterion.weight_dict["loss_mask"] == criterion.weight_dict["loss_dice"] == 1.0
    del outputs["pred_masks"]
    with pytest.raises(ValueError, match="pred_masks"):
        criterion(outputs, targets)
