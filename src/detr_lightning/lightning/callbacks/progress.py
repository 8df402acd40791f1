"""The training progress bar, showing the loss without waiting for the device at every step."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from torch import Tensor

__all__ = ["LossProgressBar"]


class LossProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the training loss (``train/loss_step``) read from
    the step's output at the trainer's logging interval (``trainer.log_every_n_steps``) and
    at an epoch's first batch, instead of at every step.

    Reading a device value makes the host wait until the device has computed it, which leaves
    the device idle while the host prepares the next step; a loss on the bar
    (``self.log(..., prog_bar=True)``) is read at every batch. Takes RichProgressBar's
    arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        every = max(int(trainer.log_every_n_steps or 1), 1)
        if isinstance(loss, Tensor) and (batch_idx % every == 0 or self._loss is None):
            self._loss = float(loss.detach())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._loss = None
        super().on_train_epoch_start(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if self._loss is not None and trainer.training:
            items["train/loss_step"] = self._loss
        return items
