"""What training prints as it runs: the progress bar, showing the loss without waiting for the
device at every step, in a terminal only, and the model summary."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelSummary, RichProgressBar
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from torch import Tensor

__all__ = ["LossProgressBar", "ParameterSummary"]

log = logging.getLogger(__name__)


class LossProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the training loss (``train/loss_step``) read from
    the step's output at the trainer's logging interval (``trainer.log_every_n_steps``) and
    at an epoch's first batch, instead of at every step.

    Reading a device value makes the host wait until the device has computed it, which leaves
    the device idle while the host prepares the next step; a loss on the bar
    (``self.log(..., prog_bar=True)``) is read at every batch. Takes RichProgressBar's
    arguments.

    Epochs are numbered from 1 of ``max_epochs``, as the epoch log line and the checkpoint
    names number them (Lightning's bar counts from 0). Without a terminal (output redirected
    to a file, a batch job's log) the bar is off: rich would print every refresh as lines of
    their own; the epoch log line says the same once per epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if not sys.stdout.isatty():
            self.disable()
        super().setup(trainer, pl_module, stage)

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        return f"{description:{len(self.validation_description)}}"

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


class ParameterSummary(ModelSummary):
    """Lightning's model summary (name, type and parameters of the top modules, the totals),
    logged, without its FLOPs: Lightning counts them only for a module with an
    ``example_input_array``, which DETRModule (images of any size, a padding mask) has not, so
    they would read 0."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [
            (name, values) for name, values in summary_data if total_flops or name != "FLOPs"
        ]
        widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
        rows = [[name for name, _ in columns]]
        rows += [list(map(str, row)) for row in zip(*(values for _, values in columns))]
        lines = [" | ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "-" * len(lines[0]))

        def count(number: int) -> str:
            return get_human_readable_count(int(number)).strip()

        lines += [
            f"{count(trainable_parameters)} trainable params, "
            f"{count(total_parameters - trainable_parameters)} non-trainable, "
            f"{count(total_parameters)} in total ({model_size:.1f} MB)"
        ]
        if total_flops:
            lines.append(f"{count(total_flops)} FLOPs")
        log.info("model summary:\n%s", "\n".join(lines))
