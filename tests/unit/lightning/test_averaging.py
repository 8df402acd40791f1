"""The EMA callback's update against a hand-computed average, and the config switches of EMA
and early stopping."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.callbacks import EarlyStopping
from torch import nn

from detr_lightning.cli.config import compose_config
from detr_lightning.lightning.callbacks import EMA, early_stopping, ema


def test_decay_warms_up_to_its_value() -> None:
    callback = EMA(decay=0.99, warmup_steps=10, start_step=4, every_n_steps=2)
    assert callback.decay_at(4) == pytest.approx(0.99 * (1 - math.exp(-1 / 10)))
    assert callback.decay_at(1003) == pytest.approx(0.99, abs=1e-12)
    assert not callback.should_update(step_idx=3)  # before the start
    assert callback.should_update(step_idx=4) and not callback.should_update(step_idx=5)
    assert not callback.should_update(epoch_idx=0)  # steps only
    assert EMA(decay=0.9, warmup_steps=0).decay_at(0) == 0.9


def test_the_update_is_the_hand_computed_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    callback = EMA(decay=0.8, warmup_steps=5)
    averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True,
                                                   multi_avg_fn=callback._average)  # fmt: skip
    reference = {k: v.clone().float() for k, v in model.state_dict().items()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        assert callback.should_update(step_idx=step)
        averaged.update_parameters(model)
        decay = 0.8 * (1 - math.exp(-(step + 1) / 5))
        for key, value in model.state_dict().items():
            if step == 0 or not value.is_floating_point():  # the first update copies
                reference[key] = value.clone().float()
            else:
                reference[key] = decay * reference[key] + (1 - decay) * value
    got = averaged.module.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(got[key].float(), value, rtol=1e-6, atol=1e-6)
    assert got["1.num_batches_tracked"] == 4  # integer buffers are copied


def test_both_are_off_by_default_and_on_with_their_setting(tmp_path) -> None:
    cfg = compose_config("train", [f"run_dir={tmp_path}"])
    assert ema(**{k: v for k, v in cfg.callbacks.ema.items() if k != "_target_"}) is None
    stop = {k: v for k, v in cfg.callbacks.early_stopping.items() if k != "_target_"}
    assert early_stopping(**stop) is None
    on = compose_config("train", [f"run_dir={tmp_path}", "callbacks.ema.decay=0.999",
                                  "callbacks.early_stopping.patience=3"])  # fmt: skip
    callback = ema(**{k: v for k, v in on.callbacks.ema.items() if k != "_target_"})
    assert isinstance(callback, EMA) and callback.decay == 0.999
    stopper = early_stopping(**{k: v for k, v in on.callbacks.early_stopping.items()
                                if k != "_target_"})  # fmt: skip
    assert isinstance(stopper, EarlyStopping) and stopper.patience == 3
    assert stopper.monitor == "val/map" and stopper.mode == "max"
    with pytest.raises(ValueError, match=r"callbacks\.ema\.decay"):
        EMA(decay=1.5)
