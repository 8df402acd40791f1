"""Graph capture per batch shape: when it captures, replays and falls back, with the capture
itself (CUDA-only) replaced by a recording stand-in."""

from __future__ import annotations

import logging

import pytest
import torch

from detr_lightning.cli.train import train
from detr_lightning.lightning.capture import CapturedSteps, capture_settings, install_capture
from detr_lightning.models import DETR, Backbone, Transformer
from detr_lightning.utils.errors import SetupError
from helpers.models import tiny_detr
from helpers.pipeline import compose_config, tiny_overrides


class _Recorder:
    """Stands in for torch.cuda.make_graphed_callables: the 'graph' runs the module eagerly
    and counts its replays; records the shapes captured."""

    def __init__(self) -> None:
        self.captured: list[tuple[int, ...]] = []
        self.replayed = 0

    def __call__(self, module, sample):
        self.captured.append(tuple(sample[0].shape))

        def graph(images, padding_mask):
            assert images.shape == sample[0].shape  # a graph replays its own shape only
            self.replayed += 1
            return module(images, padding_mask)

        return graph


def _batch(height: int, width: int, batch: int = 2):
    images = torch.randn(batch, 3, height, width)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[0, :, width // 2 :] = True
    return images, mask


def test_a_shape_is_captured_after_its_warmup_and_replayed_after():
    model = tiny_detr().train()
    recorder = _Recorder()
    steps = CapturedSteps(model, warmup=2, capture=recorder)
    images, mask = _batch(64, 96)
    for _ in range(5):
        torch.manual_seed(0)
        outputs = steps(images, mask)
    torch.manual_seed(0)
    expected = model(images, mask)
    assert recorder.captured == [(2, 3, 64, 96)]  # once, at the third call
    assert (steps.eager, steps.captures, steps.replays) == (2, 1, 2)
    assert recorder.replayed == 3  # the capturing call runs the new graph too
    # the graph's flat outputs come back in the model's own nesting
    assert outputs.keys() == expected.keys()
    torch.testing.assert_close(outputs["pred_boxes"], expected["pred_boxes"])
    assert len(outputs["aux_outputs"]) == len(expected["aux_outputs"])
    for got, want in zip(outputs["aux_outputs"], expected["aux_outputs"], strict=True):
        torch.testing.assert_close(got["pred_logits"], want["pred_logits"])
    outputs["pred_logits"].sum().backward()  # gradients flow through the replayed call
    assert any(p.grad is not None for p in model.parameters())


def test_shapes_beyond_max_shapes_run_eagerly_with_one_warning(caplog):
    recorder = _Recorder()
    steps = CapturedSteps(tiny_detr().train(), warmup=1, max_shapes=1, capture=recorder)
    first, second = _batch(64, 64), _batch(64, 96)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            steps(*first)
            steps(*second)
    assert recorder.captured == [(2, 3, 64, 64)]
    # eager: first's warm-up run and all three of second's, two of them once first held the slot
    assert steps.eager == 4 and steps.fallbacks == 2
    warnings = [r.getMessage() for r in caplog.records if "max_shapes" in r.getMessage()]
    assert len(warnings) == 1 and "(2, 3, 64, 96)" in warnings[0]


def test_a_capture_at_every_step_is_warned_about(caplog):
    recorder = _Recorder()
    steps = CapturedSteps(tiny_detr().train(), warmup=1, capture=recorder, churn_steps=3)
    shapes = [_batch(64, 64 + 32 * i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        for batch in shapes:  # warm-up runs
            steps(*batch)
        assert not caplog.records
        for batch in shapes:  # three captures in a row
            steps(*batch)
    assert len(recorder.captured) == 3
    assert any("captured at each of the last 3 steps" in r.getMessage() for r in caplog.records)


def test_evaluation_runs_eagerly_whatever_the_shape():
    recorder = _Recorder()
    model = tiny_detr()
    steps = CapturedSteps(model, warmup=1, capture=recorder)
    model.eval()
    for _ in range(3):
        steps(*_batch(64, 64))
    model.train()
    with torch.no_grad():
        steps(*_batch(64, 64))
    assert recorder.captured == [] and steps.eager == 0


def test_trainable_batchnorm_statistics_are_refused():
    model = DETR(Backbone("resnet18", norm="batch", num_stages=3), Transformer(32, 2, 1, 1, 64),
                 num_classes=3, num_queries=5)  # fmt: skip
    with pytest.raises(SetupError, match=r"backbone\.norm=frozen"):
        CapturedSteps(model)


def test_capture_settings_and_the_cpu_fallback(tmp_path, caplog):
    assert capture_settings(False) is None and capture_settings(None) is None
    assert capture_settings(True) == {}
    assert capture_settings({"warmup": 2}) == {"warmup": 2}
    for bad in ("yes", {"warmup": 2, "graphs": 3}, 1):
        with pytest.raises(SetupError, match="capture="):
            capture_settings(bad)
    with pytest.raises(SetupError, match="at least 1"):
        CapturedSteps(tiny_detr(), warmup=0)
    overrides = tiny_overrides(tmp_path, "trainer.max_epochs=1", "trainer.limit_val_batches=0",
                               "data.synthetic.num_train=8", "capture=true")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train(compose_config("train", overrides))
    assert any("CUDA graphs need a CUDA device" in r.getMessage() for r in caplog.records)


def test_install_capture_leaves_a_cpu_module_eager():
    class _Module:
        device = torch.device("cpu")
        model = tiny_detr()

    module = _Module()
    assert install_capture(module, True) is None and module.captured_steps is None
    assert install_capture(module, False) is None
