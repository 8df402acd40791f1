"""LossProgressBar: the training loss on the bar, read at the logging interval only, epochs
counted from 1, no bar without a terminal; checkpoint names and the model summary that go
with it."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from detr_lightning.lightning.callbacks import LossProgressBar
from detr_lightning.lightning.callbacks.checkpoint_names import EpochCheckpoint
from detr_lightning.lightning.callbacks.progress import ParameterSummary


class _Counting(pl.LightningModule):
    """A loss equal to the batch index, plus a parameter's zero term so that it trains."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return self.weight * 0 + float(batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Shown(pl.Callback):
    def __init__(self, bar: LossProgressBar) -> None:
        self.bar, self.shown = bar, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shown.append(self.bar.get_metrics(trainer, pl_module).get("train/loss_step"))


def test_the_bar_reads_the_loss_at_the_logging_interval():
    bar = LossProgressBar()
    shown = _Shown(bar)
    data = torch.utils.data.DataLoader(torch.zeros(7, 1), batch_size=1)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[bar, shown],
                         log_every_n_steps=3, accelerator="cpu")  # fmt: skip
    trainer.fit(_Counting(), data)
    # read at batches 0, 3 and 6 of each epoch, and afresh at an epoch's start
    assert shown.shown == [0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 6.0] * 2


def _fit(callbacks, tmp_path=None, **settings):
    data = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)
    trainer = pl.Trainer(max_epochs=2, logger=False, accelerator="cpu", callbacks=callbacks,
                         default_root_dir=tmp_path, **settings)  # fmt: skip
    trainer.fit(_Counting(), data)
    return trainer


def test_the_bar_is_off_without_a_terminal_and_counts_epochs_from_1(monkeypatch):
    """Redirected output gets no bar (rich printed each refresh as a block of lines); in a
    terminal the bar numbers epochs as the epoch log line does: "Epoch 1/2", not "0/1"."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    bar = LossProgressBar()
    _fit([bar], enable_checkpointing=False, enable_model_summary=False)
    assert bar.is_disabled

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    bar = LossProgressBar()
    _fit([bar], enable_checkpointing=False, enable_model_summary=False)
    assert bar.is_enabled
    assert bar._get_train_description(0).strip() == "Epoch 1/2"
    assert bar._get_train_description(1).strip() == "Epoch 2/2"


def test_checkpoint_names_count_epochs_from_1(tmp_path):
    checkpoint = EpochCheckpoint(
        dirpath=tmp_path, filename="e{epoch:03d}", save_top_k=-1, auto_insert_metric_name=False
    )
    trainer = _fit([checkpoint], tmp_path, enable_progress_bar=False, enable_model_summary=False)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["e001.ckpt", "e002.ckpt"]
    # the epoch recorded inside, which resuming reads, stays Lightning's
    assert torch.load(tmp_path / "e002.ckpt", weights_only=True)["epoch"] == 1
    assert trainer.current_epoch == 2


def test_the_model_summary_shows_no_flops_it_did_not_count(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detr_lightning.lightning.callbacks.progress"):
        _fit([ParameterSummary()], tmp_path, enable_progress_bar=False, enable_checkpointing=False)
    (summary,) = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("model summary:")
    ]
    assert "1 trainable params" in summary and "| Params" in summary
    assert "FLOP" not in summary.upper()


def test_epoch_checkpoint_state_resumes_with_lightnings_class():
    """Runs written with ModelCheckpoint resume their best score with EpochCheckpoint."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from detr_lightning.lightning.callbacks.checkpoint_names import EpochCheckpoint

    ours = EpochCheckpoint(monitor="val/map", mode="max")
    theirs = ModelCheckpoint(monitor="val/map", mode="max")
    assert ours.state_key == theirs.state_key
    assert ours.state_key != EpochCheckpoint(monitor="val/map", mode="min").state_key
