"""PostProcess against the official formulation written out in the test."""

from __future__ import annotations

import pytest
import torch

from detr_lightning.models import PostProcess

SIZES = torch.tensor([[480, 640], [300, 200]])  # (height, width) per image


def random_outputs(seed: int, batch: int = 2, queries: int = 12, classes: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(batch, queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.05
    return {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=generator) * 2,
        "pred_boxes": torch.cat([centers, sizes], dim=-1),
    }


def reference(outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per image, every query: best real class, its probability, absolute xyxy box."""
    logits = outputs["pred_logits"].double()
    prob = logits.exp() / logits.exp().sum(-1, keepdim=True)
    scores, labels = prob[..., :-1].max(-1)
    results = []
    for i, (height, width) in enumerate(target_sizes.tolist()):
        cx, cy, w, h = outputs["pred_boxes"][i].double().unbind(-1)
        boxes = torch.stack(
            [
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            ],
            dim=-1,
        )
        results.append({"scores": scores[i], "labels": labels[i], "boxes": boxes})
    return results


def assert_same(result: dict, expected: dict) -> None:
    assert result["labels"].dtype == torch.int64
    assert result["boxes"].shape == (len(result["scores"]), 4)
    torch.testing.assert_close(result["scores"].double(), expected["scores"], atol=1e-6, rtol=0)
    assert torch.equal(result["labels"], expected["labels"])
    torch.testing.assert_close(result["boxes"].double(), expected["boxes"], atol=1e-3, rtol=0)


def test_all_queries_kept_by_default() -> None:
    outputs = random_outputs(0)
    results = PostProcess()(outputs, SIZES)
    assert len(results) == 2
    for result, expected in zip(results, reference(outputs, SIZES), strict=True):
        assert len(result["scores"]) == 12
        assert_same(result, expected)
        assert (result["labels"] < 4).all()  # never the no-object class


def test_target_sizes_as_list_of_tuples() -> None:
    outputs = random_outputs(1)
    from_list = PostProcess()(outputs, [(480, 640), (300, 200)])
    for result, expected in zip(from_list, reference(outputs, SIZES), strict=True):
        assert_same(result, expected)


def test_score_threshold_keeps_scores_above_it() -> None:
    outputs = random_outputs(2, queries=30)
    threshold = 0.5
    results = PostProcess(score_threshold=threshold)(outputs, SIZES)
    for result, expected in zip(results, reference(outputs, SIZES), strict=True):
        keep = expected["scores"] > threshold
        assert 0 < keep.sum() < 30  # the case exercises both sides of the threshold
        assert_same(result, {key: value[keep] for key, value in expected.items()})


def test_top_k_keeps_highest_scores_sorted() -> None:
    outputs = random_outputs(3, queries=20)
    results = PostProcess(top_k=5)(outputs, SIZES)
    for result, expected in zip(results, reference(outputs, SIZES), strict=True):
        order = expected["scores"].argsort(descending=True)[:5]
        assert_same(result, {key: value[order] for key, value in expected.items()})


def test_threshold_then_top_k() -> None:
    outputs = random_outputs(4, queries=40)
    threshold, top_k = 0.4, 3
    results = PostProcess(score_threshold=threshold, top_k=top_k)(outputs, SIZES)
    for result, expected in zip(results, reference(outputs, SIZES), strict=True):
        kept = (expected["scores"] > threshold).nonzero().flatten()
        order = kept[expected["scores"][kept].argsort(descending=True)][:top_k]
        assert len(kept) > top_k
        assert_same(result, {key: value[order] for key, value in expected.items()})


def test_top_k_sorts_even_when_fewer_detections_survive() -> None:
    # Scores rise with the query index; 3 of 6 queries pass the threshold, top_k is 5.
    logits = torch.zeros(1, 6, 3)
    logits[0, :, 0] = torch.linspace(-2.0, 4.0, 6)
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 6, 4), 0.5)}
    (result,) = PostProcess(score_threshold=0.5, top_k=5)(outputs, [(10, 10)])
    assert len(result["scores"]) == 3
    assert torch.equal(result["scores"], result["scores"].sort(descending=True).values)


@pytest.mark.parametrize("bad_sizes", [[[480, 640]], [[480, 640, 3], [300, 200, 3]], [480, 640]])
def test_target_sizes_shape_rejected(bad_sizes) -> None:
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(random_outputs(5), torch.tensor(bad_sizes))
