"""Which checkpoint a training run resumes (``ckpt_path``, ``resume=auto``, a requeued job),
and the check that it fits the config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from ..checkpoints.reading import needs_config_file, read_checkpoint, read_loaded_checkpoint
from ..checkpoints.run_files import (
    HPC_CHECKPOINT_GLOB,
    LoadedCheckpoint,
    last_checkpoint_path,
    load_resume_checkpoint,
)
from ..lightning import compat
from ..lightning.callbacks.preemption import launcher_requeue_handler
from ..lightning.module import DETRModule
from ..utils.errors import CheckpointError, SetupError
from .hydra_dirs import run_dir_given, without_resolver

__all__ = ["check_resume", "resume_checkpoint"]

log = logging.getLogger(__name__)


def check_resume(
    module: DETRModule, ckpt_path: str, checkpoint: dict[str, Any] | None = None
) -> None:
    """Refuse to resume a checkpoint whose model or labels differ from the config's.

    ``checkpoint``: the file's contents if they were already loaded (not read again)."""
    if checkpoint is None:
        info = read_checkpoint(ckpt_path)
    else:
        info = read_loaded_checkpoint(checkpoint, ckpt_path)
    if info["format"] != "lightning":
        raise ValueError(
            f"ckpt_path={ckpt_path} is a {info['format']} checkpoint; ckpt_path resumes a "
            "training run from its Lightning .ckpt. To start from these weights use "
            f"pretrained={ckpt_path}"
        )
    # how the weights were first loaded, how batches run, and how fast the backbone learns:
    # none is part of the model that the checkpoint holds
    ignored = {"backbone.pretrained", "backbone.weights", "backbone.lr", "batch_invariant"}
    saved, ours = _flat(info["model"]), _flat(module.hparams["model"])
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, config {ours.get(key)!r}"
        for key in sorted((set(saved) | set(ours)) - ignored)
        if saved.get(key) != ours.get(key)
    ]
    if info["label_map"] != module.label_map:
        differences.append("label map (the dataset's categories)")
    if differences:
        raise ValueError(
            f"cannot resume {ckpt_path}: its model differs from the config's in "
            + "; ".join(differences)
            + ". Resume with the run's own model.*/backbone.*/data.* overrides (see its "
            "config.yaml), or start a new run from its weights with pretrained=..."
        )


def _flat(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested spec's settings under dotted keys (``backbone.name``, ``hidden_dim``)."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint that this run resumes, or None to start a new run.

    ``ckpt_path=<file>`` resumes that file; ``ckpt_path=last`` the run dir's
    ``checkpoints/last.ckpt``; ``resume=auto`` the newest checkpoint of the run dir that loads
    (:func:`~detr_lightning.checkpoints.run_files.load_resume_checkpoint`), or nothing (a new
    run, with a log line) when there is none yet, so that one command serves the first start
    and every restart. A requeued job (SLURM, or a submitit launcher's job) resumes as with
    ``resume=auto`` when the run dir holds an ``hpc_ckpt_<n>.ckpt`` (saved before the job
    requeued itself; under SLURM Lightning would load it anyway; here it is checked first). A job
    that SLURM requeued (``SLURM_RESTART_COUNT`` > 0) resumes the run dir's newest checkpoint
    also when its command gives ``ckpt_path``, if that checkpoint is newer than the file.
    """
    return _resume(cfg)[0]


def _resume(cfg: DictConfig) -> tuple[str | None, LoadedCheckpoint | None]:
    """:func:`resume_checkpoint`, and the checkpoint's contents where finding it loaded them
    (``resume=auto``, SLURM requeue), else None."""
    ckpt_path, resume = cfg.get("ckpt_path"), cfg.get("resume")
    run_dir = Path(cfg.run_dir)
    if resume not in (None, "auto"):
        raise SetupError(f"resume={resume!r}: the only value is auto (null: do not resume)")
    if ckpt_path and resume:
        raise SetupError(
            f"ckpt_path={ckpt_path} and resume=auto both say what to resume; pass one of them"
        )
    if ckpt_path and _slurm_restarts() > 0:
        found = _newer_run_checkpoint(run_dir, ckpt_path)
        if found is not None:
            return str(found.path), found
    if ckpt_path == "last":
        path = last_checkpoint_path(run_dir)
        if not path.is_file():
            raise SetupError(
                f"ckpt_path=last: {path} does not exist. ckpt_path=last resumes the run in "
                "run_dir: pass the interrupted run's directory as run_dir=... (or "
                "hydra.run.dir=...), or give the checkpoint file as ckpt_path=PATH"
            )
        return str(path), None
    if ckpt_path:
        path = os.path.expanduser(str(ckpt_path))
        if not os.path.isfile(path):
            raise SetupError(
                f"ckpt_path={ckpt_path}: no such file. Give a Lightning checkpoint of the run "
                "(<run_dir>/checkpoints/last.ckpt), ckpt_path=last for the one of run_dir, or "
                "resume=auto to resume the newest checkpoint of run_dir"
            )
        return path, None
    job = SLURMEnvironment.detect() or launcher_requeue_handler() is not None
    requeued = job and any(run_dir.glob(HPC_CHECKPOINT_GLOB))
    if resume is None and not requeued:
        return None, None
    if resume == "auto":
        _check_fixed_run_dir(cfg)
    found = load_resume_checkpoint(run_dir)
    if found is None:
        log.info("resume=auto: no checkpoint in %s yet, starting a new run there", run_dir)
        return None, None
    state = found.state
    log.info(
        "resuming %s (epoch %d, global step %d)", found.path, state["epoch"], state["global_step"]
    )
    return str(found.path), found


def _slurm_restarts() -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``; 0 if never)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(count) if count.isdigit() else 0


def _newer_run_checkpoint(run_dir: Path, ckpt_path: str) -> LoadedCheckpoint | None:
    """For a requeued job that runs its first command again: the run dir's newest checkpoint
    that loads, where it is newer than ``ckpt_path`` (the file that command resumed; resumed
    again at every requeue, the run would go back to it every time), else None."""
    given = last_checkpoint_path(run_dir) if ckpt_path == "last" else Path(str(ckpt_path))
    try:
        found = load_resume_checkpoint(run_dir, newer_than=given.expanduser())
    except SetupError as error:
        log.warning("requeued job: %s; resuming ckpt_path=%s as given", error, ckpt_path)
        return None
    if found is not None:
        log.warning(
            "requeued job (SLURM_RESTART_COUNT=%d): resuming %s (epoch %d, global step %d), "
            "saved after ckpt_path=%s, which the job's command names",
            _slurm_restarts(), found.path, found.state["epoch"], found.state["global_step"],
            ckpt_path,
        )  # fmt: skip
    return found


def _load_if_torch_file(path: str) -> LoadedCheckpoint | None:
    """The contents of ``path`` if :func:`check_resume` would read it as one torch file and it
    loads, else None: other formats and broken files are then named by :func:`check_resume`."""
    if not Path(path).is_file() or needs_config_file(Path(path)):
        return None
    try:
        return LoadedCheckpoint.read(path)
    except CheckpointError:
        return None


def _loads_in_this_process(trainer: pl.Trainer) -> bool:
    """Whether ``trainer.fit`` restores its checkpoint in this process: not where it forks or
    spawns its ranks (``ddp_fork``, ``ddp_spawn``, ``ddp_notebook``), whose parent only waits
    and would hold the checkpoint for the whole run."""
    return not compat.spawns_processes(trainer)


def _check_fixed_run_dir(cfg: DictConfig) -> None:
    """resume=auto looks in run_dir: refuse the default run dir, which is new at every start
    (outputs/train/<date>_<time>; under SLURM it is named after the job id and stays)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # called from Python: run_dir is what the caller gave
        return
    hydra = HydraConfig.get()
    if (
        run_dir_given(cfg)
        or Path(cfg.run_dir).resolve() != Path(hydra.runtime.output_dir).resolve()
    ):
        return  # run_dir=... given (Hydra's directory follows it: detr_lightning.cli.hydra_dirs)
    node = "sweep" if hydra.mode == RunMode.MULTIRUN else "run"
    pattern = without_resolver(str(OmegaConf.to_container(hydra[node], resolve=False)["dir"]))
    if "${now:" in pattern and not ("SLURM_JOB_ID" in pattern and os.environ.get("SLURM_JOB_ID")):
        raise SetupError(
            f"resume=auto resumes the run in its run dir, but the run dir {cfg.run_dir} is new "
            f"at every start (hydra.{node}.dir={pattern}). Name the run's directory, the same "
            "on the first start and on every restart: run_dir=outputs/train/<name> or "
            "hydra.run.dir=outputs/train/<name>"
        )
