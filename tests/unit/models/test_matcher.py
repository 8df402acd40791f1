"""Hungarian matcher: optimality against brute force, batching invariants, bad inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import generalized_box_iou
from transformers.loss.loss_for_object_detection import HungarianMatcher as HFHungarianMatcher

from detr_lightning.models import HungarianMatcher
from detr_lightning.models import matcher as matcher_module
from detr_lightning.models.matcher import NonFiniteCostError


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def random_boxes(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Normalized cxcywh boxes with positive size, [*shape, 4]."""
    centers = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(*shape, 2, generator=generator) * 0.35 + 0.05
    return torch.cat([centers, sizes], dim=-1)


def random_outputs(
    batch: int, num_queries: int, num_classes: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    return {
        "pred_logits": torch.randn(batch, num_queries, num_classes + 1, generator=generator),
        "pred_boxes": random_boxes(batch, num_queries, generator=generator),
    }


def random_targets(
    sizes: list[int], num_classes: int, generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "labels": torch.randint(0, num_classes, (size,), generator=generator),
            "boxes": random_boxes(size, generator=generator),
        }
        for size in sizes
    ]


def reference_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    labels: torch.Tensor,
    target_boxes: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 5.0, 2.0),
) -> torch.Tensor:
    """[Q, T] cost from the paper's formula, one entry at a time (float64)."""
    cost_class, cost_bbox, cost_giou = weights
    prob = logits.double().softmax(-1)
    giou = generalized_box_iou(
        cxcywh_to_xyxy(pred_boxes.double()), cxcywh_to_xyxy(target_boxes.double())
    )
    cost = torch.empty(len(pred_boxes), len(target_boxes), dtype=torch.float64)
    for q in range(len(pred_boxes)):
        for t in range(len(target_boxes)):
            l1 = (pred_boxes[q].double() - target_boxes[t].double()).abs().sum()
            cost[q, t] = cost_class * -prob[q, labels[t]] + cost_bbox * l1 - cost_giou * giou[q, t]
    return cost


def brute_force_minimum(cost: torch.Tensor) -> float:
    """Smallest total cost over every one-to-one assignment of min(Q, T) pairs."""
    num_queries, num_targets = cost.shape
    if num_queries >= num_targets:
        return min(
            sum(float(cost[q, t]) for t, q in enumerate(queries))
            for queries in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(float(cost[q, t]) for q, t in enumerate(chosen))
        for chosen in itertools.permutations(range(num_targets), num_queries)
    )


def assert_valid_assignment(rows: torch.Tensor, cols: torch.Tensor, num_q: int, num_t: int):
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert len(rows) == len(cols) == min(num_q, num_t)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert all(0 <= r < num_q for r in rows.tolist())
    assert all(0 <= c < num_t for c in cols.tolist())


def check_optimal(
    matcher: HungarianMatcher,
    num_queries: int,
    sizes: list[int],
    seed: int,
    weights: tuple[float, float, float],
) -> None:
    generator = torch.Generator().manual_seed(seed)
    outputs = random_outputs(len(sizes), num_queries, 4, generator)
    targets = random_targets(sizes, 4, generator)
    indices = matcher(outputs, targets)
    assert len(indices) == len(sizes)
    for i, (rows, cols) in enumerate(indices):
        assert_valid_assignment(rows, cols, num_queries, sizes[i])
        if sizes[i] == 0:
            continue
        cost = reference_cost(
            outputs["pred_logits"][i],
            outputs["pred_boxes"][i],
            targets[i]["labels"],
            targets[i]["boxes"],
            weights,
        )
        total = float(cost[rows, cols].sum())
        assert total == pytest.approx(brute_force_minimum(cost), abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("num_queries", "sizes"), [(6, [4, 1]), (4, [4, 3]), (5, [2, 0]), (2, [4])]
)
def test_assignment_is_optimal(seed: int, num_queries: int, sizes: list[int]) -> None:
    check_optimal(HungarianMatcher(), num_queries, sizes, seed, (1.0, 5.0, 2.0))


@pytest.mark.parametrize("weights", [(2.0, 1.0, 0.0), (0.0, 0.0, 1.0), (3.0, 0.0, 0.5)])
def test_custom_cost_weights_are_optimal(weights: tuple[float, float, float]) -> None:
    matcher = HungarianMatcher(
        set_cost_class=weights[0], set_cost_bbox=weights[1], set_cost_giou=weights[2]
    )
    for seed in range(3):
        check_optimal(matcher, 6, [4, 3], seed, weights)


@settings(max_examples=25, deadline=None, database=None)
@given(
    num_queries=st.integers(1, 6),
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    weights=st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0), st.floats(0.0, 5.0)).filter(
        lambda w: sum(w) > 0.1
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_assignment_is_optimal_property(num_queries, sizes, weights, seed) -> None:
    matcher = HungarianMatcher(
        set_cost_class=weights[0], set_cost_bbox=weights[1], set_cost_giou=weights[2]
    )
    check_optimal(matcher, num_queries, sizes, seed, weights)


def test_all_zero_weights_rejected() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(set_cost_class=0, set_cost_bbox=0, set_cost_giou=0)


def test_same_assignment_as_transformers_matcher() -> None:
    generator = torch.Generator().manual_seed(10)
    sizes = [3, 0, 5, 1]
    outputs = random_outputs(len(sizes), 10, 5, generator)
    targets = random_targets(sizes, 5, generator)
    ours = HungarianMatcher()(outputs, targets)
    reference = HFHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)(
        {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
        [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets],
    )
    for (rows, cols), (ref_rows, ref_cols) in zip(ours, reference, strict=True):
        assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(
            zip(ref_rows.tolist(), ref_cols.tolist(), strict=True)
        )


def test_match_layers_equals_matching_each_layer_and_image_alone() -> None:
    generator = torch.Generator().manual_seed(3)
    sizes = [2, 0, 4, 1]
    layers = [random_outputs(len(sizes), 6, 3, generator) for _ in range(3)]
    targets = random_targets(sizes, 3, generator)
    matcher = HungarianMatcher()
    batched = matcher.match_layers(layers, targets)
    assert len(batched) == len(layers)
    for layer, layer_indices in zip(layers, batched, strict=True):
        assert len(layer_indices) == len(sizes)
        assert [(r.tolist(), c.tolist()) for r, c in matcher(layer, targets)] == [
            (r.tolist(), c.tolist()) for r, c in layer_indices
        ]
        for i, (rows, cols) in enumerate(layer_indices):
            single = {key: value[i : i + 1] for key, value in layer.items()}
            ((alone_rows, alone_cols),) = matcher(single, [targets[i]])
            assert torch.equal(rows, alone_rows) and torch.equal(cols, alone_cols)


def test_layers_are_matched_independently() -> None:
    # Two layers whose boxes are swapped must get swapped assignments.
    boxes = torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]]])
    logits = torch.zeros(1, 2, 3)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes[0].clone()}]
    layers = [
        {"pred_logits": logits, "pred_boxes": boxes},
        {"pred_logits": logits, "pred_boxes": boxes.flip(1)},
    ]
    first, second = HungarianMatcher().match_layers(layers, targets)
    assert dict(zip(first[0][0].tolist(), first[0][1].tolist(), strict=True)) == {0: 0, 1: 1}
    assert dict(zip(second[0][0].tolist(), second[0][1].tolist(), strict=True)) == {0: 1, 1: 0}


def test_images_without_targets_get_empty_int64_indices() -> None:
    generator = torch.Generator().manual_seed(4)
    outputs = random_outputs(3, 5, 2, generator)
    targets = random_targets([0, 2, 0], 2, generator)
    indices = HungarianMatcher()(outputs, targets)
    for i in (0, 2):
        rows, cols = indices[i]
        assert rows.shape == cols.shape == (0,)
        assert rows.dtype == cols.dtype == torch.int64
    assert_valid_assignment(*indices[1], 5, 2)


def test_batch_without_any_targets() -> None:
    generator = torch.Generator().manual_seed(5)
    layers = [random_outputs(2, 5, 2, generator) for _ in range(3)]
    targets = random_targets([0, 0], 2, generator)
    result = HungarianMatcher().match_layers(layers, targets)
    assert len(result) == 3
    for layer_indices in result:
        assert len(layer_indices) == 2
        for rows, cols in layer_indices:
            assert rows.numel() == 0 and cols.numel() == 0
            assert rows.dtype == cols.dtype == torch.int64


def test_targets_batch_size_mismatch_rejected() -> None:
    generator = torch.Generator().manual_seed(6)
    outputs = random_outputs(2, 5, 2, generator)
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(outputs, random_targets([1, 1, 1], 2, generator))


def test_autocast_bf16_inputs_are_matched_in_fp32(monkeypatch) -> None:
    solved_dtypes = []
    solve = matcher_module.linear_sum_assignment

    def recording_solve(cost):
        solved_dtypes.append(cost.dtype)
        return solve(cost)

    monkeypatch.setattr(matcher_module, "linear_sum_assignment", recording_solve)
    generator = torch.Generator().manual_seed(7)
    sizes = [4, 3, 0]
    layers = [random_outputs(len(sizes), 8, 5, generator) for _ in range(2)]
    layers_bf16 = [{k: v.bfloat16() for k, v in layer.items()} for layer in layers]
    targets = random_targets(sizes, 5, generator)
    matcher = HungarianMatcher()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = matcher.match_layers(layers_bf16, targets)
    assert solved_dtypes and all(dtype == np.float32 for dtype in solved_dtypes)
    # The same bf16 values upcast by hand give the same assignment.
    upcast = [{k: v.float() for k, v in layer.items()} for layer in layers_bf16]
    expected = matcher.match_layers(upcast, targets)
    for mixed_layer, expected_layer in zip(mixed, expected, strict=True):
        for (rows, cols), (exp_rows, exp_cols) in zip(mixed_layer, expected_layer, strict=True):
            assert torch.equal(rows, exp_rows) and torch.equal(cols, exp_cols)


@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes"])
def test_nan_predictions_raise(key: str) -> None:
    generator = torch.Generator().manual_seed(8)
    outputs = random_outputs(2, 5, 3, generator)
    outputs[key][1, 2, 0] = float("nan")
    targets = random_targets([2, 3], 3, generator)
    with pytest.raises(NonFiniteCostError, match="NaN"):
        HungarianMatcher()(outputs, targets)
