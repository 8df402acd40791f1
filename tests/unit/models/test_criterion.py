"""SetCriterion: parity with transformers' DETR loss, logged metrics, weights, bad labels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

from detr_lightning.models import HungarianMatcher, SetCriterion

NUM_CLASSES = 5
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def random_boxes(*shape: int, generator: torch.Generator) -> torch.Tensor:
    centers = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(*shape, 2, generator=generator) * 0.35 + 0.05
    return torch.cat([centers, sizes], dim=-1)


def random_case(
    sizes: list[int], num_layers: int = 3, num_queries: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Per-layer logits [L, B, Q, C+1], boxes [L, B, Q, 4] and targets."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(sizes)
    logits = torch.randn(num_layers, batch, num_queries, NUM_CLASSES + 1, generator=generator)
    boxes = random_boxes(num_layers, batch, num_queries, generator=generator)
    targets = [
        {
            "labels": torch.randint(0, NUM_CLASSES, (size,), generator=generator),
            "boxes": random_boxes(size, generator=generator),
        }
        for size in sizes
    ]
    return logits, boxes, targets


def model_outputs(logits: torch.Tensor, boxes: torch.Tensor) -> dict:
    return {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [
            {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
            for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1], strict=True)
        ],
    }


def transformers_loss(logits, boxes, targets):
    config = SimpleNamespace(
        class_cost=1.0,
        bbox_cost=5.0,
        giou_cost=2.0,
        num_labels=NUM_CLASSES,
        eos_coefficient=0.1,
        auxiliary_loss=True,
        bbox_loss_coefficient=5.0,
        giou_loss_coefficient=2.0,
        decoder_layers=logits.shape[0],
    )
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    total, loss_dict, _ = ForObjectDetectionLoss(
        logits[-1], labels, "cpu", boxes[-1], config, outputs_class=logits, outputs_coord=boxes
    )
    return total, loss_dict


def make_criterion(num_decoder_layers: int = 3, **kwargs) -> SetCriterion:
    return SetCriterion(
        NUM_CLASSES,
        HungarianMatcher(),
        eos_coef=0.1,
        num_decoder_layers=num_decoder_layers,
        **kwargs,
    )


@pytest.mark.parametrize("seed", range(3))
def test_loss_terms_match_transformers(seed: int) -> None:
    logits, boxes, targets = random_case([3, 0, 5], seed=seed)
    ours = make_criterion()(model_outputs(logits, boxes), targets)
    reference_total, reference = transformers_loss(logits, boxes, targets)

    expected_keys = {f"{term}{suffix}" for term in LOSS_TERMS for suffix in ("", "_0", "_1")}
    assert expected_keys <= set(ours)
    for key in sorted(expected_keys):
        assert ours[key].item() == pytest.approx(reference[key].item(), abs=1e-4), key
    assert ours["cardinality_error"].item() == pytest.approx(
        reference["cardinality_error"].item(), abs=1e-6
    )
    total = make_criterion().weighted_total(ours)
    assert total.item() == pytest.approx(reference_total.item(), abs=1e-4)


def test_loss_matches_transformers_with_one_decoder_layer() -> None:
    logits, boxes, targets = random_case([2, 4], num_layers=1, seed=5)
    outputs = {"pred_logits": logits[0], "pred_boxes": boxes[0]}
    criterion = make_criterion(num_decoder_layers=1)
    ours = criterion(outputs, targets)
    reference_total, reference = transformers_loss(logits, boxes, targets)
    for key in LOSS_TERMS:
        assert ours[key].item() == pytest.approx(reference[key].item(), abs=1e-4)
    assert not any(key.endswith("_0") for key in ours)
    assert criterion.weighted_total(ours).item() == pytest.approx(reference_total.item(), abs=1e-4)


def test_batch_without_targets_is_pure_no_object_cross_entropy() -> None:
    logits, boxes, targets = random_case([0, 0], seed=6)
    losses = make_criterion()(model_outputs(logits, boxes), targets)
    for layer, suffix in zip(range(3), ("_0", "_1", ""), strict=True):
        # Every query is "no object": all weights equal, so the weighted mean is the plain mean.
        expected = -logits[layer].log_softmax(-1)[..., NUM_CLASSES].mean()
        assert losses["loss_ce" + suffix].item() == pytest.approx(expected.item(), abs=1e-5)
        assert losses["loss_bbox" + suffix].item() == 0.0
        assert losses["loss_giou" + suffix].item() == 0.0
    assert losses["class_error"].item() == pytest.approx(100.0)


def test_weight_dict_keys_and_values() -> None:
    criterion = make_criterion(num_decoder_layers=3)
    base = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    expected = dict(base)
    for i in range(2):
        expected.update({f"{key}_{i}": value for key, value in base.items()})
    assert criterion.weight_dict == expected

    no_aux = make_criterion(num_decoder_layers=6, aux_loss=False)
    assert no_aux.weight_dict == base

    custom = SetCriterion(
        3,
        HungarianMatcher(),
        ce_loss_coef=2.0,
        bbox_loss_coef=4.0,
        giou_loss_coef=0.5,
        num_decoder_layers=2,
    )
    assert custom.weight_dict == {
        "loss_ce": 2.0, "loss_bbox": 4.0, "loss_giou": 0.5,
        "loss_ce_0": 2.0, "loss_bbox_0": 4.0, "loss_giou_0": 0.5,
    }  # fmt: skip


def test_weighted_total_ignores_logged_metrics() -> None:
    criterion = make_criterion(num_decoder_layers=2)
    losses = {
        "loss_ce": torch.tensor(1.5),
        "loss_bbox": torch.tensor(0.25),
        "loss_giou": torch.tensor(0.75),
        "loss_ce_0": torch.tensor(2.0),
        "loss_bbox_0": torch.tensor(0.5),
        "loss_giou_0": torch.tensor(1.0),
        "class_error": torch.tensor(50.0),
        "cardinality_error": torch.tensor(3.0),
    }
    expected = 1.5 + 5 * 0.25 + 2 * 0.75 + 2.0 + 5 * 0.5 + 2 * 1.0
    assert criterion.weighted_total(losses).item() == pytest.approx(expected)


def test_class_and_cardinality_error_hand_computed() -> None:
    # 2 classes + no-object (index 2). Query boxes equal their intended target's box, so the
    # matching is fixed by the box costs: image 0 q0->t0, q1->t1; image 1 q1->t0.
    box_a, box_b, box_c = (0.2, 0.2, 0.1, 0.1), (0.7, 0.3, 0.2, 0.2), (0.5, 0.7, 0.3, 0.2)
    far = (0.9, 0.9, 0.05, 0.05)
    boxes = torch.tensor([[box_a, box_b, far], [far, box_c, far]])
    high = 6.0
    logits = torch.zeros(2, 3, 3)
    logits[0, 0, 0] = high  # target class 0: correct
    logits[0, 1, 0] = high  # target class 1: wrong
    logits[0, 2, 1] = high  # unmatched, but predicts an object
    logits[1, 0, 2] = high  # no object
    logits[1, 1, 1] = high  # target class 1: correct
    logits[1, 2, 2] = high  # no object
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([box_a, box_b])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([box_c])},
    ]
    criterion = SetCriterion(2, HungarianMatcher(), num_decoder_layers=1)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # 2 of 3 matched queries right.
    assert losses["class_error"].item() == pytest.approx(100.0 / 3.0, abs=1e-4)
    # Image 0: 3 object predictions vs 2 targets; image 1: 1 vs 1 -> mean |error| = 0.5.
    assert losses["cardinality_error"].item() == pytest.approx(0.5)
    # Matched boxes are exact: no box loss at all.
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    # (torchvision's GIoU loss adds eps=1e-7 to the union: ~1e-5 on these small boxes)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-4)


def test_gradients_flow_to_every_layer() -> None:
    raw_logits, raw_boxes, targets = random_case([3, 0, 2], seed=8)
    logits = raw_logits.clone().requires_grad_(True)
    box_params = torch.logit(raw_boxes).requires_grad_(True)  # boxes come out of a sigmoid
    criterion = make_criterion()
    losses = criterion(model_outputs(logits, box_params.sigmoid()), targets)
    criterion.weighted_total(losses).backward()
    for grad in (logits.grad, box_params.grad):
        assert grad is not None and torch.isfinite(grad).all()
    for layer in range(3):
        assert logits.grad[layer].abs().sum() > 0
        # Matched queries of images with targets get a box gradient; image 1 has none.
        assert box_params.grad[layer, 0].abs().sum() > 0
        assert box_params.grad[layer, 1].abs().sum() == 0


def test_losses_from_precomputed_matching_and_layers_of_unequal_match_counts() -> None:
    """``criterion(outputs, targets, criterion.match(...))`` equals the one-call form, and the
    per-layer sums stay per layer when layers match different numbers of pairs."""
    logits, boxes, targets = random_case([3, 0, 5], seed=7)
    outputs = model_outputs(logits, boxes)
    criterion = make_criterion()
    indices = criterion.match(outputs, targets)
    given, computed = criterion(outputs, targets, indices), criterion(outputs, targets)
    assert given.keys() == computed.keys()
    assert all(torch.equal(given[key], computed[key]) for key in given)
    # drop the last pair of the final layer only: its L1 sum loses that pair's term alone
    trimmed = [list(layer) for layer in indices]
    src, tgt = trimmed[0][2]
    trimmed[0][2] = (src[:-1], tgt[:-1])
    full, less = criterion(outputs, targets, indices), criterion(outputs, targets, trimmed)
    pred = outputs["pred_boxes"][2, src[-1]]
    dropped = (pred - targets[2]["boxes"][tgt[-1]]).abs().sum() / 8  # 8 target boxes
    assert float(full["loss_bbox"] - less["loss_bbox"]) == pytest.approx(float(dropped), abs=1e-6)
    for key in ("loss_bbox_0", "loss_bbox_1", "loss_giou_0", "loss_ce_1"):
        assert torch.equal(full[key], less[key]), key


@pytest.mark.parametrize("sizes", [[3, 0, 5], [1, 4]])
def test_batched_layer_losses_equal_each_layer_alone(sizes: list[int]) -> None:
    """Every layer's terms, computed together over the stacked layers, equal those of a
    one-layer criterion called on that layer alone with its own matching; the total equals
    the weighted sum of the terms, term by term."""
    num_layers = 6
    logits, boxes, targets = random_case(sizes, num_layers=num_layers, seed=11)
    criterion = make_criterion(num_decoder_layers=num_layers)
    outputs = model_outputs(logits, boxes)
    indices = criterion.match(outputs, targets)
    losses, total = criterion.losses_and_total(outputs, targets, indices)
    single = make_criterion(num_decoder_layers=1, aux_loss=False)
    # criterion's order: the final layer first, then the auxiliary layers from the first
    order = [num_layers - 1, *range(num_layers - 1)]
    for position, layer in enumerate(order):
        alone = single({"pred_logits": logits[layer], "pred_boxes": boxes[layer]}, targets,
                       [indices[position]])  # fmt: skip
        suffix = "" if position == 0 else f"_{position - 1}"
        for term in LOSS_TERMS:
            torch.testing.assert_close(losses[term + suffix], alone[term], atol=1e-6, rtol=0)
    by_term = sum(losses[key] * weight for key, weight in criterion.weight_dict.items())
    torch.testing.assert_close(total, by_term, atol=1e-6, rtol=0)
    torch.testing.assert_close(criterion.weighted_total(losses), total, atol=1e-6, rtol=0)


def test_total_follows_an_edited_weight_dict() -> None:
    logits, boxes, targets = random_case([2, 3], seed=3)
    criterion = make_criterion()
    outputs = model_outputs(logits, boxes)
    _, before = criterion.losses_and_total(outputs, targets)
    criterion.weight_dict["loss_giou_1"] = 0.0
    losses, after = criterion.losses_and_total(outputs, targets)
    torch.testing.assert_close(before - after, 2.0 * losses["loss_giou_1"], atol=1e-6, rtol=0)
