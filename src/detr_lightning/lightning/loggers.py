"""A CSV logger whose ``metrics.csv`` continues when a run resumes, and the callback that keeps
the logs in step with the checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.utilities import rank_zero_only

from ..utils.io import atomic_write
from . import compat


class _ContinuingWriter(compat.KeepingExperimentWriter):
    """Lightning's writer, except that an existing ``metrics.csv`` is kept for a resumed run."""

    def __init__(self, log_dir: str) -> None:
        self.resumed = False  # set by CSVLogger.continue_file
        self._sorted_out = False  # whether the rows of an existing file were dealt with
        super().__init__(log_dir)

    def save(self) -> None:
        if self.metrics and not self._sorted_out:
            # a resumed run logs again from its checkpoint's step on: older rows from that step
            # on are the interrupted run's lost work; a new run starts the file anew
            first = min(int(row["step"]) for row in self.metrics) if self.resumed else 0
            self._keep_steps_before(first)
            self._sorted_out = True
        super().save()

    def _keep_steps_before(self, step: int) -> None:
        path = Path(self.metrics_file_path)
        header: list[str] = []
        kept: list[dict[str, str]] = []
        if step > 0 and path.is_file():
            with path.open(newline="") as file:
                reader = csv.DictReader(file)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if _step(row) < step]
        if kept:

            def write(tmp: str) -> None:
                with open(tmp, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=header)
                    writer.writeheader()
                    writer.writerows(kept)

            atomic_write(path, write)
        else:
            path.unlink(missing_ok=True)
        self.metrics_keys = header if kept else []


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")  # a row that a kill cut short: compares False, dropped


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger (same arguments and files) whose ``metrics.csv`` survives a resume.

    Lightning's writer deletes an existing ``metrics.csv`` when a run starts. In a resumed run
    (:class:`ResumableLogs` calls :meth:`continue_file`) this one keeps the rows logged before
    the step at which the run continues and appends after them; the rows that the interrupted
    run logged after its checkpoint are dropped, since the resumed run logs those steps again.
    A new run starts the file anew.
    """

    _ahead: tuple[int, dict[str, Any]] | None = None  # the row log_ahead wrote

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        return compat.csv_experiment(self, lambda: _ContinuingWriter(log_dir=self.log_dir))

    @rank_zero_only
    def continue_file(self) -> None:
        """Keep the existing metrics.csv up to the step at which this run continues."""
        self.experiment.resumed = True

    @rank_zero_only
    def log_ahead(self, metrics: dict[str, float], step: int) -> None:
        """Log ``step``'s row before Lightning does (the caller saves it); Lightning's own call
        for that step then logs only what differs (nothing, unless a later hook logged more).
        A second checkpoint at the same step logs nothing more."""
        if self._ahead is not None and self._ahead[0] == step:
            return
        self.log_metrics(metrics, step)
        self._ahead = (step, dict(metrics))

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        ahead = self._ahead
        if ahead is not None and step == ahead[0]:
            self._ahead = None
            metrics = {k: v for k, v in metrics.items() if ahead[1].get(k, object()) != v}
            if not metrics:
                return
        super().log_metrics(metrics, step)


class ResumableLogs(pl.Callback):
    """Flushes the loggers into their files with every checkpoint, and tells
    :class:`CSVLogger` when a run resumes.

    Without the flush, a SIGKILL loses the rows logged since the last one (Lightning flushes
    every 100 steps), rows that the checkpoint's work produced. A checkpoint written every n
    training steps also ends a batch whose row Lightning logs only after the checkpoint;
    :class:`CSVLogger` writes that row first. So once a checkpoint of global step s is on
    disk, metrics.csv holds every step before s, and a run resumed from it logs s onwards.
    """

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        row = compat.unlogged_step_row(trainer)
        for logger in trainer.loggers:
            if row is not None and isinstance(logger, CSVLogger):
                logger.log_ahead(row[1], step=row[0])
            logger.save()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.continue_file()


__all__ = ["CSVLogger", "ResumableLogs"]
