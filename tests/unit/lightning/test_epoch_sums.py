"""EpochSums: the training losses' epoch means that a mid-epoch checkpoint carries."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from detr_lightning.cli.train import train
from detr_lightning.lightning.epoch_sums import EpochSums
from helpers.pipeline import compose_config, tiny_overrides


def test_weighted_means_and_totals_by_hand():
    sums = EpochSums()
    assert sums.means() == {}
    sums.add({"loss": torch.tensor(2.0), "loss_ce": torch.tensor(1.0)}, weight=4)
    sums.add({"loss": torch.tensor(5.0), "loss_ce": torch.tensor(0.5)}, weight=2)
    sums.add({"stand_in_images": torch.tensor(3.0)}, mean=False)
    sums.add({"stand_in_images": torch.tensor(1.0)}, mean=False)
    # (2*4 + 5*2) / 6 = 3; (1*4 + 0.5*2) / 6 = 5/6; 3 + 1 = 4
    assert sums.means() == pytest.approx({"loss": 3.0, "loss_ce": 5 / 6, "stand_in_images": 4.0})
    sums.reset()
    assert sums.means() == {}


def test_a_checkpoint_carries_the_sums_to_one_rank():
    sums = EpochSums()
    sums.reset(epoch=3)
    sums.add({"loss": torch.tensor(2.0)}, weight=4)
    sums.add({"stand_in_images": torch.tensor(1.0)}, mean=False)
    state = sums.state_dict()
    # plain lists (a weights_only load takes them), sorted by name, and the epoch they sum
    assert state == {"epoch": 3, "names": ["loss", "stand_in_images"], "totals": [8.0, 1.0],
                     "weights": [4.0, 1.0], "means": [True, False]}  # fmt: skip
    kept, zeroed = EpochSums(), EpochSums()
    kept.load_state_dict(state, torch.device("cpu"))
    zeroed.load_state_dict(state, torch.device("cpu"), keep=False)
    assert kept.epoch == zeroed.epoch == 3
    for restored in (kept, zeroed):  # the resumed epoch's next step
        restored.add({"loss": torch.tensor(6.0)}, weight=4)
        restored.add({"stand_in_images": torch.tensor(2.0)}, mean=False)
    assert kept.means() == pytest.approx({"loss": 4.0, "stand_in_images": 3.0})
    # another rank: zeros under the same names, so that the ranks' sums line up
    assert zeroed.state_dict()["names"] == ["loss", "stand_in_images"]
    assert zeroed.means() == pytest.approx({"loss": 6.0, "stand_in_images": 2.0})


class _ReadsEpochLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def test_callbacks_read_the_epoch_loss_at_the_epochs_end(tmp_path):
    """A callback's on_train_epoch_end runs before the module's: it finds train/loss (as with
    Lightning's own epoch aggregation), equal to metrics.json's train_loss."""
    reader = _ReadsEpochLoss()
    train(compose_config("train", tiny_overrides(tmp_path)), [reader])
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert reader.losses == pytest.approx([entry["train_loss"] for entry in history], rel=1e-6)
    assert len(reader.losses) == 2
