"""The one module that reads (and in two places sets) Lightning's internals.

Lightning has no public API for what the run's stop, resume and logs need: where the fit loop
is within its epoch, whether the batch under way closes an optimizer step, the flag of its
SIGTERM handling, the step row its logger connector has yet to write, the cluster environment
of its accelerator connector, how its strategy starts processes, and the CSV logger's writer
(which deletes an existing metrics.csv that a resumed run continues). Everything of that kind
goes through this module, so that a Lightning upgrade is checked here (the supported range is
pinned in pyproject.toml, and tests/unit/test_layers.py keeps these names out of every other
module).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import ClusterEnvironment
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

__all__ = [
    "KeepingExperimentWriter",
    "attached_trainer",
    "batch_closes_step",
    "cluster_environment",
    "csv_experiment",
    "is_last_batch",
    "sigterm_flag",
    "spawns_processes",
    "trained_batches",
    "unlogged_step_row",
]


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises then)."""
    return module._trainer


def trained_batches(trainer: pl.Trainer) -> int:
    """How many batches of the current training epoch have been trained: 0 when an epoch
    starts, more when a run resumes from a checkpoint written mid-epoch (restored from it by
    the time the first batch is drawn). Lightning's count of processed batches, which also
    holds where ``training_step`` draws its batch itself (``dataloader_iter``): its count of
    batches drawn is one ahead there."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the training batch under way is its epoch's last."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def batch_closes_step(trainer: pl.Trainer) -> bool:
    """Whether the training batch under way ends an optimizer step (not one that gradient
    accumulation adds to the next); True where Lightning does not tell."""
    accumulating = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return accumulating is None or not accumulating()


class _SigtermFlag:
    """Lightning's flag that a SIGTERM came: its loops stop at their next check when it is
    set (``trainer._signal_connector.received_sigterm``)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self._connector = getattr(trainer, "_signal_connector", None)

    @property
    def available(self) -> bool:
        return self._connector is not None

    def get(self) -> bool:
        return bool(self._connector is not None and self._connector.received_sigterm)

    def set(self, value: bool) -> None:
        if self._connector is not None:
            self._connector.received_sigterm = value


def sigterm_flag(trainer: pl.Trainer) -> _SigtermFlag:
    """Read and set Lightning's SIGTERM flag of ``trainer``."""
    return _SigtermFlag(trainer)


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment | None:
    """The cluster environment that Lightning chose for ``trainer`` (torchrun's, SLURM's...)."""
    return getattr(trainer._accelerator_connector, "cluster_environment", None)


def spawns_processes(trainer: pl.Trainer) -> bool:
    """Whether ``trainer.fit`` runs its ranks in processes that it forks or spawns
    (``ddp_fork``, ``ddp_spawn``, ``ddp_notebook``), whose parent only waits."""
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def unlogged_step_row(trainer: pl.Trainer) -> tuple[int, dict[str, Any]] | None:
    """The step metrics of the training batch that a checkpoint ends, when Lightning has yet
    to log them: a checkpoint every n steps is written in ``on_train_batch_end``, and Lightning
    logs that batch's row only after the hook. ``None`` when nothing is pending (a checkpoint
    at the end of an epoch, a step that logs nothing) or when Lightning's internals differ
    from those this reads (then the row may be lost on a kill, as before)."""
    try:
        loop, connector = trainer.fit_loop.epoch_loop, trainer._logger_connector
        step = loop._batches_that_stepped
        if not trainer.training or trainer.sanity_checking or step >= trainer.global_step:
            return None
        if not connector.should_update_logs:
            return None
        metrics = convert_tensors_to_scalars(dict(connector.metrics["log"]))
    except (AttributeError, KeyError, TypeError):
        return None
    if not metrics:
        return None
    # what Lightning's own call adds to a row without an explicit step
    metrics.setdefault("epoch", trainer.current_epoch)
    return step, metrics


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing ``metrics.csv`` at its start
    (its private ``_check_log_dir_exists``), which a resumed run continues."""

    def _check_log_dir_exists(self) -> None:
        """Nothing: the file is the resumed run's (see detr_lightning.lightning.loggers)."""


def csv_experiment(logger: CSVLogger, make_writer: Any) -> Any:
    """A CSV logger's writer, made by ``make_writer()`` at the first use (what
    ``CSVLogger.experiment`` does with its private ``_experiment`` and ``_fs``)."""
    if logger._experiment is None:
        logger._fs.makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = make_writer()
    return logger._experiment
