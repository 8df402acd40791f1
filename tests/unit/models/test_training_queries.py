"""Training-only query groups (Group DETR) and denoising queries (DN-DETR): the attention
structure they promise, checked against runs of the plain model, and their losses against
term-by-term references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from detr_lightning.models import build_criterion
from detr_lightning.models.training_queries import TRAINING_ONLY_PREFIX, DecoderQueries
from helpers.models import NUM_CLASSES, NUM_QUERIES, tiny_detr

BATCH_TARGETS = [
    {"labels": torch.tensor([0, 3, 1]),
     "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2], [0.7, 0.2, 0.3, 0.1]])},
    {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.6]])},
]  # fmt: skip


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


def _model(**settings) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_detr(dropout=0.0, **settings).train()  # training mode, deterministic


def _plain_outputs(model, queries: torch.Tensor, images: torch.Tensor) -> dict:
    """The model's outputs with ``queries`` as its own and no training-only queries."""
    extra = model.training_queries
    saved = model.query_embed.weight.data.clone()
    try:
        model.training_queries = None
        model.query_embed.weight.data.copy_(queries)
        return model(images)
    finally:
        model.training_queries = extra
        model.query_embed.weight.data.copy_(saved)


def test_each_query_group_predicts_as_the_model_alone_with_its_queries() -> None:
    model = _model(query_groups=3)
    images = _images()
    with torch.no_grad():
        out = model(images)
        groups = [out, *out["group_outputs"]]
        assert len(groups) == 3
        extra = model.training_queries.group_queries.view(2, NUM_QUERIES, -1)
        for queries, group in zip([model.query_embed.weight, *extra], groups):
            alone = _plain_outputs(model, queries, images)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(group[key], alone[key], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(group["aux_outputs"][0]["pred_boxes"],
                                       alone["aux_outputs"][0]["pred_boxes"],
                                       rtol=1e-5, atol=1e-5)  # fmt: skip


def test_matching_queries_do_not_see_the_denoising_ones() -> None:
    model = _model(denoising={"groups": 2, "label_noise": 0.5, "box_noise": 0.4})
    images = _images(1)
    with torch.no_grad():
        out = model(images, None, BATCH_TARGETS)
        alone = _plain_outputs(model, model.query_embed.weight, images)
    torch.testing.assert_close(out["pred_logits"], alone["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], alone["pred_boxes"], rtol=1e-5, atol=1e-5)
    dn = out["dn_outputs"]
    assert dn["pred_logits"].shape == (2, 3, 2, 3, NUM_CLASSES + 1)  # layers, B, D, T, C+1
    assert dn["valid"].tolist() == [[True, True, True], [False] * 3, [True, False, False]]
    assert dn["labels"][0].tolist() == [0, 3, 1] and dn["labels"][2, 0] == 4


def _decode(model, images: torch.Tensor, queries: DecoderQueries) -> torch.Tensor:
    """Every layer's boxes [L, B, N, 4] of the decoder started from ``queries``."""
    features, mask = model.backbone(images, torch.zeros(images.shape[0], *images.shape[2:],
                                                        dtype=torch.bool))  # fmt: skip
    pos = model.position_encoding(mask)
    hidden, _ = model.transformer(model.input_proj(features), mask, queries, pos)
    return model.bbox_embed(hidden).sigmoid()


def _changed(queries: DecoderQueries, part: str, where) -> DecoderQueries:
    tensor = getattr(queries, part).clone()
    tensor[where] += 3.0
    return dataclasses.replace(queries, **{part: tensor})


def test_denoising_groups_do_not_see_each_other_nor_padded_slots() -> None:
    """Moving one denoising group's queries changes that group's outputs only; changing the
    padded slots (beyond an image's objects) changes no other query's output."""
    model = _model(denoising={"groups": 2, "label_noise": 0.0, "box_noise": 0.0})
    images, q = _images(2), NUM_QUERIES
    with torch.no_grad():
        made = model.training_queries(model.query_embed.weight, 3, BATCH_TARGETS)
        assert made.content.shape[1] == q + 2 * 3  # 3 slots per group: the most objects
        base = _decode(model, images, made)
        group1 = _decode(
            model, images, _changed(made, "position", (slice(None), slice(q + 3, None)))
        )
        padded = (
            torch.tensor([1, 1, 1, 1, 1, 1, 2, 2, 2, 2]),
            torch.tensor([q, q + 1, q + 2, q + 3, q + 4, q + 5, q + 1, q + 2, q + 4, q + 5]),
        )
        pad_changed = _decode(model, images, _changed(made, "content", padded))
    torch.testing.assert_close(group1[:, :, : q + 3], base[:, :, : q + 3], rtol=0, atol=1e-6)
    assert (group1[:, :, q + 3 :] - base[:, :, q + 3 :]).abs().max() > 1e-3
    real = torch.ones(3, q + 6, dtype=torch.bool)
    real[padded] = False
    torch.testing.assert_close(pad_changed[:, real], base[:, real], rtol=0, atol=1e-6)
    assert (pad_changed[:, ~real] - base[:, ~real]).abs().max() > 1e-3  # they did change


def test_query_group_losses_are_the_mean_of_each_group_alone() -> None:
    model = _model(query_groups=2)
    criterion = build_criterion(NUM_CLASSES, num_decoder_layers=2)
    with torch.no_grad():
        out = model(_images(3))
        losses, total = criterion.losses_and_total(out, BATCH_TARGETS)
        own = {k: out[k] for k in ("pred_logits", "pred_boxes", "aux_outputs")}
        each = [criterion(group, BATCH_TARGETS) for group in (own, out["group_outputs"][0])]
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_0"):
        torch.testing.assert_close(losses[name], (each[0][name] + each[1][name]) / 2)
    for name in ("class_error", "cardinality_error"):  # the model's own queries
        torch.testing.assert_close(losses[name], each[0][name])
    torch.testing.assert_close(total, criterion.weighted_total(losses))


def test_denoising_losses_against_a_query_by_query_reference() -> None:
    model = _model(denoising={"groups": 2})
    criterion = build_criterion(NUM_CLASSES, num_decoder_layers=2, denoising=True)
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(_images(4), None, BATCH_TARGETS)
        losses, total = criterion.losses_and_total(out, BATCH_TARGETS)
        plain = criterion({k: v for k, v in out.items() if k != "dn_outputs"}, BATCH_TARGETS)
    dn = out["dn_outputs"]
    num_boxes = sum(len(t["labels"]) for t in BATCH_TARGETS)
    for layer, suffix in enumerate(["", "_0"]):  # the final layer first
        ce, l1, giou, count = 0.0, 0.0, 0.0, 0
        for image, target in enumerate(BATCH_TARGETS):
            for group in range(2):
                for slot, (label, box) in enumerate(zip(target["labels"], target["boxes"])):
                    logits = dn["pred_logits"][layer, image, group, slot]
                    pred = dn["pred_boxes"][layer, image, group, slot]
                    ce += F.cross_entropy(logits[None], label[None]).item()
                    l1 += (pred - box).abs().sum().item()
                    xyxy = [torch.cat([b[:2] - b[2:] / 2, b[:2] + b[2:] / 2]) for b in (pred, box)]
                    giou += generalized_box_iou_loss(xyxy[0], xyxy[1]).item()
                    count += 1
        assert losses["loss_ce_dn" + suffix].item() == pytest.approx(ce / count, rel=1e-5)
        assert losses["loss_bbox_dn" + suffix].item() == pytest.approx(
            l1 / (num_boxes * 2), rel=1e-5
        )
        assert losses["loss_giou_dn" + suffix].item() == pytest.approx(
            giou / (num_boxes * 2), rel=1e-5
        )
        assert losses["loss_ce" + suffix] == plain["loss_ce" + suffix]  # matching: unchanged
    torch.testing.assert_close(total, criterion.weighted_total(losses))
    assert criterion.weight_dict["loss_giou_dn_0"] == criterion.weight_dict["loss_giou_0"] == 2.0


def test_a_batch_without_objects_trains_the_denoising_parameters_too() -> None:
    """One padded slot per group keeps the graph the same (DDP needs every parameter used)."""
    model = _model(denoising={"groups": 3})
    criterion = build_criterion(NUM_CLASSES, num_decoder_layers=2, denoising=True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(_images(5)[:2], None, empty)
    losses, total = criterion.losses_and_total(out, empty)
    assert out["dn_outputs"]["valid"].shape == (2, 1) and not out["dn_outputs"]["valid"].any()
    assert losses["loss_bbox_dn"] == 0 and losses["loss_ce_dn"] == 0
    total.backward()
    assert all(p.grad is not None for p in model.training_queries.parameters())


def test_noise_follows_the_settings() -> None:
    model = _model(denoising={"groups": 200, "label_noise": 0.25, "box_noise": 0.4})
    queries = model.training_queries
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.3, 0.4, 0.2, 0.4]])}]  # fmt: skip
    torch.manual_seed(0)
    noised = queries._noised_ground_truth(targets, torch.device("cpu"))
    labels = noised["noised_labels"].view(200, 2)
    kept = (labels == torch.tensor([1, 2])).float().mean().item()
    # a replaced label is random among 5 classes: kept with 0.75 + 0.25 / 5 = 0.8
    assert kept == pytest.approx(0.8, abs=0.04)
    boxes = noised["noised_boxes"].view(200, 2, 4)
    truth = targets[0]["boxes"]
    shift = (boxes[..., :2] - truth[:, :2]).abs()
    assert (shift <= 0.4 * truth[:, 2:] / 2 + 1e-6).all()  # centers: at most box_noise * w/2
    scale = boxes[..., 2:] / truth[:, 2:]
    assert scale.min() >= 0.6 - 1e-6 and scale.max() <= 1.4 + 1e-6
    assert scale.std() > 0.1 and shift.max() > 0.05  # and the noise is there


def test_training_only_queries_stay_out_of_evaluation_and_need_targets_for_denoising() -> None:
    model = _model(query_groups=2, denoising={"groups": 1})
    with pytest.raises(ValueError, match="targets"):
        model(_images())
    model.eval()
    out = model(_images())
    assert set(out) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert out["pred_logits"].shape[1] == NUM_QUERIES
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith(TRAINING_ONLY_PREFIX)} == {
        "group_queries", "label_embed", "box_embed"
    }  # fmt: skip


@pytest.mark.parametrize(
    "settings, message",
    [({"query_groups": 0}, "query_groups"), ({"denoising": {"groups": -1}}, "groups"),
     ({"denoising": {"label_noise": 2.0}}, "label_noise"),
     ({"denoising": {"group": 3}}, "unknown key")],
)  # fmt: skip
def test_bad_settings_are_named(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_detr(**settings)


def test_a_group_gets_no_gradient_from_another_groups_loss() -> None:
    model = _model(query_groups=3, denoising={"groups": 2})
    out = model(_images(6), None, BATCH_TARGETS)
    # group 0's predictions only (all layers): the other groups' queries must get exactly 0
    loss = out["pred_boxes"].sum() + out["pred_logits"].logsumexp(-1).sum()
    loss = loss + sum(layer["pred_boxes"].sum() for layer in out["aux_outputs"])
    loss.backward()
    grad = model.training_queries.group_queries.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    assert model.training_queries.label_embed.weight.grad is None or torch.count_nonzero(
        model.training_queries.label_embed.weight.grad
    ) == 0  # fmt: skip
    assert torch.count_nonzero(model.query_embed.weight.grad) > 0  # its own queries do
    model.zero_grad()
    out = model(_images(6), None, BATCH_TARGETS)
    out["group_outputs"][1]["pred_boxes"].sum().backward()  # group 2 alone
    grad = model.training_queries.group_queries.grad.view(2, NUM_QUERIES, -1)
    assert torch.count_nonzero(grad[0]) == 0 and torch.count_nonzero(grad[1]) > 0
    assert torch.count_nonzero(model.query_embed.weight.grad) == 0


def test_the_exported_graph_and_the_inference_weights_are_plain_detrs() -> None:
    """A model trained with groups and denoising, with its training-only tensors left out,
    loads strictly into a plain DETR and exports the same graph outputs."""
    from detr_lightning.deploy.graph import DeployableDETR

    grouped = _model(query_groups=3, denoising={"groups": 2}).eval()
    plain = _model().eval()
    state = {
        k: v for k, v in grouped.state_dict().items() if not k.startswith(TRAINING_ONLY_PREFIX)
    }
    plain.load_state_dict(state, strict=True)
    images = _images(7)
    mask = torch.zeros(3, 64, 96, dtype=torch.bool)
    mask[1, 48:] = True
    with torch.no_grad():
        graph_grouped, graph_plain = DeployableDETR(grouped), DeployableDETR(plain)
        assert not any(k.startswith("model." + TRAINING_ONLY_PREFIX)
                       for k in graph_grouped.state_dict())  # fmt: skip
        for a, b in zip(graph_grouped(images, mask), graph_plain(images, mask)):
            assert torch.equal(a, b)
