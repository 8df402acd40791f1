"""LossProgressBar: the training loss on the bar, read at the logging interval only."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from detr_lightning.lightning.callbacks import LossProgressBar


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
