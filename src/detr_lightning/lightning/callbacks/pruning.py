"""Pruning a hyper-parameter search's trial: the monitored metric of every validation goes to
the trial, and the run stops cleanly when the trial's pruner says that it will not do better
than the trials before it.

The trial is any object with Optuna's ``report(value, step)`` and ``should_prune()`` (an
``optuna.trial.Trial``); this module does not import Optuna, which is an optional
dependency. Optuna's own Lightning callback (``optuna-integration``) is written for the
``lightning`` package (``lightning.pytorch.Callback``), which a ``pytorch_lightning.Trainer``
does not accept as a callback.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import pytorch_lightning as pl

__all__ = ["ReportedTrial", "TrialPruning"]

log = logging.getLogger(__name__)


class ReportedTrial(Protocol):
    """What :class:`TrialPruning` needs of a trial (``optuna.trial.Trial`` has it)."""

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


class TrialPruning(pl.Callback):
    """Reports ``monitor`` (e.g. ``val/map``) to ``trial`` after each validation and stops the
    run when the trial should be pruned.

    The step of a report is the number of validations before it (0 for the first), which is
    the epoch with one validation per epoch. A pruned run is not interrupted: Lightning ends
    it after the validation as after its last epoch, so its checkpoints, ``metrics.json`` and
    logs are written as for any run; the caller then marks the trial pruned (``pruned``,
    ``pruned_at``). One process only: a multi-device run would need every rank to ask the
    same trial.
    """

    def __init__(self, trial: ReportedTrial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.validations = 0
        self.pruned = False
        self.pruned_at: int | None = None  # the step of the report that pruned the trial
        self.reports: dict[int, float] = {}  # step: value, as reported

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                f"TrialPruning reports from one process, but the trainer runs "
                f"{trainer.world_size}: train each trial on one device (trainer.devices=1)"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned:
            return
        if self.monitor not in trainer.callback_metrics:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise KeyError(
                f"the pruned metric {self.monitor} was not logged by the validation "
                f"(logged: {logged})"
            )
        value = float(trainer.callback_metrics[self.monitor])
        step = self.validations
        self.validations += 1
        if math.isnan(value):
            log.warning("%s is NaN after validation %d: not reported to the trial", self.monitor,
                        step)  # fmt: skip
            return
        self.trial.report(value, step)
        self.reports[step] = value
        if self.trial.should_prune():
            self.pruned, self.pruned_at = True, step
            trainer.should_stop = True
            log.info("%s=%.4f after validation %d: the trial is pruned, the run stops here",
                     self.monitor, value, step)  # fmt: skip
