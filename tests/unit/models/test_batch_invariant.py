"""Batch-invariant evaluation: with ``batch_invariant`` every image gets the predictions it gets
alone; without it the padding of a batch changes the smaller images' predictions. Evaluation
warns when it batches differently than training did."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from detr_lightning.cli.eval import evaluate
from detr_lightning.cli.train import build_module, check_resume, instantiate_data, train
from detr_lightning.models import DETR
from helpers.models import tiny_detr, tiny_eval_detr
from helpers.pipeline import compose_config, tiny_overrides

# Four sizes; the first is the largest in both directions, so only it is left unpadded.
SIZES = [(96, 128), (64, 80), (33, 100), (96, 47)]
KEYS = ("pred_logits", "pred_boxes")


@pytest.fixture(scope="module")
def model() -> DETR:
    return tiny_eval_detr()


def random_images(sizes: list[tuple[int, int]], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, height, width, generator=generator) for height, width in sizes]


@torch.no_grad()
def predictions(model: DETR, images, batch_invariant: bool) -> dict:
    model.batch_invariant = batch_invariant
    try:
        return model(images)
    finally:
        model.batch_invariant = False


def test_each_image_gets_its_result_alone(model: DETR) -> None:
    images = random_images(SIZES)
    alone = [predictions(model, [image], batch_invariant=False) for image in images]
    invariant = predictions(model, images, batch_invariant=True)
    padded = predictions(model, images, batch_invariant=False)
    for i, own in enumerate(alone):
        for key in KEYS:
            torch.testing.assert_close(invariant[key][i], own[key][0], atol=1e-5, rtol=0)
        for layer, own_layer in zip(invariant["aux_outputs"], own["aux_outputs"]):
            torch.testing.assert_close(layer["pred_boxes"][i], own_layer["pred_boxes"][0],
                                       atol=1e-5, rtol=0)  # fmt: skip
    # The option matters: the padded batch moves every padded image's logits and boxes ...
    for i in range(1, len(SIZES)):
        assert (padded["pred_logits"][i] - alone[i]["pred_logits"][0]).abs().max() > 1e-2, i
        assert (padded["pred_boxes"][i] - alone[i]["pred_boxes"][0]).abs().max() > 1e-3, i
    # ... and only theirs: the unpadded image is the same either way
    for key in KEYS:
        torch.testing.assert_close(padded[key][0], alone[0][key][0], atol=1e-5, rtol=0)


def test_images_of_one_size_keep_their_place(model: DETR) -> None:
    """Same-size images share a backbone call; each result still lands at its own index."""
    images = random_images([(40, 40), (32, 72), (40, 40)], seed=2)
    invariant = predictions(model, images, batch_invariant=True)
    for i, image in enumerate(images):
        own = predictions(model, [image], batch_invariant=False)
        for key in KEYS:
            torch.testing.assert_close(invariant[key][i], own[key][0], atol=1e-5, rtol=0)


def test_same_weights_and_a_mask_it_cannot_read_is_an_error(model: DETR) -> None:
    built = tiny_detr(batch_invariant=True)
    assert built.batch_invariant and not tiny_detr().batch_invariant
    assert list(built.state_dict()) == list(model.state_dict())
    images = torch.zeros(2, 3, 64, 64)
    padding_mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    padding_mask[1, :32] = True  # padding on top: the valid pixels are not top-left
    model.batch_invariant = True
    try:
        with pytest.raises(ValueError, match="top-left corner"):
            model(images, padding_mask)
    finally:
        model.batch_invariant = False


def test_gradients_reach_the_backbone() -> None:
    detr = tiny_detr(batch_invariant=True).train()
    outputs = detr(random_images([(40, 40), (32, 48)], seed=3))
    (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()).backward()
    gradient = detr.backbone.body.layer4[0].conv1.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


@pytest.mark.slow
def test_eval_warns_when_it_batches_unlike_training(tmp_path, caplog) -> None:
    run = tmp_path / "run"
    train(compose_config("train", tiny_overrides(run, "trainer.max_epochs=1", "callbacks=default",
                                                 "callbacks.progress_bar=null")))  # fmt: skip
    checkpoint = run / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert stored["hyper_parameters"]["data"]["train_per_device_batch_size"] == 4
    assert stored["hyper_parameters"]["model"]["batch_invariant"] is False

    def warnings_of(name: str, ckpt, *overrides: str) -> list[str]:
        caplog.clear()
        cfg = compose_config("eval", ["trainer.enable_progress_bar=false", f"ckpt_path={ckpt}",
                                      f"run_dir={tmp_path / name}", *overrides])  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="detr_lightning"):
            evaluate(cfg)
        return [r.getMessage() for r in caplog.records if "images per device" in r.getMessage()]

    (message,) = warnings_of("other", checkpoint, "data.val_batch_size=2")
    assert "evaluating with 2 images per device but the model was trained with 4" in message
    assert "batch_invariant=true" in message
    invariant = ("data.val_batch_size=2", "batch_invariant=true")
    assert warnings_of("invariant", checkpoint, *invariant) == []
    written = json.loads((tmp_path / "invariant" / "metrics.json").read_text())
    assert written["batch_invariant"] is True
    # checkpoints from before the training batch size was stored: nothing to compare with
    del stored["hyper_parameters"]["data"]["train_per_device_batch_size"]
    torch.save(stored, tmp_path / "old.ckpt")
    assert warnings_of("old", tmp_path / "old.ckpt", "data.val_batch_size=2") == []

    # the option changes no weight: a run resumes with it switched on
    overrides = tiny_overrides(tmp_path / "resumed", "model.batch_invariant=true")
    cfg = compose_config("train", overrides)
    module = build_module(cfg, instantiate_data(cfg.data))
    assert module.model.batch_invariant
    check_resume(module, str(checkpoint))
