"""The Trainer of a run: the configured one, with crash-safe checkpoint files, the callbacks
every training run has, and a device count checked against the processes a launcher started."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig

from ..checkpoints.run_files import last_checkpoint_path
from ..lightning import compat
from ..lightning.callbacks.preemption import SignalStop
from ..lightning.callbacks.progress import ParameterSummary
from ..lightning.checkpoint_io import AtomicCheckpointIO
from ..lightning.loggers import ResumableLogs
from ..lightning.nonfinite import NonFiniteStop
from ..lightning.runtime import resolve_precision
from ..utils.errors import SetupError

__all__ = ["build_trainer", "check_launched_processes", "requeue_signal", "run_callbacks"]

log = logging.getLogger(__name__)


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    built = [
        instantiate(value) for value in node.values() if value is not None and "_target_" in value
    ]
    return [item for item in built if item is not None]  # a node's factory may say "off"


def check_launched_processes(trainer: pl.Trainer) -> None:
    """Refuse a trainer whose devices x nodes is not the number of processes that torchrun or
    srun started, or that would start processes inside a job of the submitit local launcher.

    Lightning checks the count only where it starts the DDP processes itself. Otherwise, with
    one device, it runs one independent training per process (each with the whole batch, all
    writing into the same run dir), and with more devices per task each task starts its own.
    """
    devices, nodes = trainer.num_devices, trainer.num_nodes
    asked = (
        f"the trainer has {devices} device(s) x {nodes} node(s) (trainer.devices, "
        "trainer.num_nodes)"
    )
    if TorchElasticEnvironment.detect():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if devices == local and devices * nodes == world:
            return
        raise SetupError(
            f"torchrun started {world} processes ({local} per node), but {asked}: pass "
            f"trainer.devices={local} (torchrun's --nproc_per_node) and trainer.num_nodes="
            f"{world // max(local, 1)} (its --nnodes); each process is one device's rank"
        )
    # srun's tasks (unset in a batch script's own shell, one process)
    step = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    tasks = int(step) if step.isdigit() else None
    if SLURMEnvironment.detect():
        # Lightning takes the ranks from SLURM and starts no process itself: the srun tasks
        # are the ranks
        if devices * nodes != (tasks or 1):
            started = f"srun started {tasks} tasks" if tasks else "this process is not an srun task"
            raise SetupError(
                f"{started}, but {asked}: under SLURM every device is one srun task "
                "(#SBATCH --ntasks-per-node=<trainer.devices> --nodes=<trainer.num_nodes>, "
                "then srun detr-train ...); to have Lightning start the processes of one "
                "task itself, run it as a job named interactive (srun --job-name=interactive)"
            )
    elif tasks is not None and tasks > 1:
        # a job named bash or interactive: Lightning ignores SLURM, so every srun task would
        # be a separate run (and start its own processes for devices > 1)
        raise SetupError(
            f"srun started {tasks} tasks in the job {os.environ.get('SLURM_JOB_NAME')!r}, "
            "and Lightning does not take ranks from SLURM in a job of that name: run one "
            "srun task (Lightning then starts trainer.devices processes), or name the job "
            "otherwise (srun --job-name=detr) to run one task per device"
        )
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID") and devices * nodes > 1:
        raise SetupError(
            f"hydra/launcher=local runs each job as one process, in which Lightning cannot start "
            f"DDP processes ({asked}): use trainer.devices=1 with it, or run multi-device jobs "
            "one after the other with Hydra's basic launcher (detr-train -m ... without "
            "hydra/launcher)"
        )


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback] | None = None, stage: str = "fit"
) -> pl.Trainer:
    """The configured Trainer, with crash-safe checkpoint files that load with
    ``weights_only=True``, under SLURM Lightning's environment without its requeue handler, a
    device count that matches the processes torchrun or srun started, and
    ``trainer.precision=auto`` resolved for ``stage`` (:func:`resolve_precision`)."""
    loggers = _instantiate_dict(cfg.get("logger"))
    all_callbacks = _instantiate_dict(cfg.get("callbacks")) + list(callbacks or [])
    precision = resolve_precision(cfg.trainer, stage)
    if str(cfg.trainer.get("precision")) == "auto":
        log.info("trainer.precision=auto: %s", precision)
    trainer = instantiate(
        cfg.trainer,
        callbacks=all_callbacks,
        logger=loggers or False,
        default_root_dir=cfg.run_dir,
        plugins=[AtomicCheckpointIO()],
        precision=precision,
    )
    # Lightning chooses the cluster environment (torchrun's over SLURM's); the requeue is
    # SignalStop's (run_callbacks), which stops all ranks at one step, not that of Lightning's
    # SLURM environment, which saves from its signal handler, mid-step
    environment = compat.cluster_environment(trainer)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False
    check_launched_processes(trainer)
    return trainer


def requeue_signal(cfg: DictConfig) -> signal.Signals | None:
    """The signal on which a SLURM job saves its state and requeues itself
    (``slurm.requeue_signal`` with ``slurm.auto_requeue``; :class:`SignalStop`), or None (not
    under SLURM, or auto_requeue off)."""
    settings = cfg.get("slurm")
    if settings is None or not settings.auto_requeue or not SLURMEnvironment.detect():
        return None
    name = str(settings.requeue_signal).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if not hasattr(signal.Signals, name) or name in ("SIGTERM", "SIGKILL", "SIGSTOP"):
        raise SetupError(
            f"slurm.requeue_signal={settings.requeue_signal} is not a signal that a job can "
            "be asked for; use the one of sbatch --signal (e.g. USR1 for --signal=USR1@90)"
        )
    return signal.Signals[name]


def run_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Callbacks that every training run has, whatever the ``callbacks`` group says: loggers
    flushed into each checkpoint, the stop on SIGTERM and SLURM's requeue signal, the
    non-finite loss limit."""
    last = last_checkpoint_path(cfg.run_dir)
    callbacks: list[pl.Callback] = [ResumableLogs(), SignalStop(last, requeue_signal(cfg))]
    if cfg.trainer.get("enable_model_summary") is not False:
        callbacks.append(ParameterSummary())  # instead of Lightning's, which shows 0 FLOPs
    limit = cfg.get("nonfinite", {}).get("max_consecutive")
    if limit is not None:
        callbacks.append(NonFiniteStop(limit, last))
    return callbacks
