"""Checkpoint files of a training run: crash-safe writes, safe loads, and which one to resume.

A run's checkpoints live in ``<run_dir>/checkpoints/`` (``last.ckpt``: the newest training
state; ``best-*.ckpt``: the best validation mAP); under SLURM, a job that requeues itself adds
``<run_dir>/hpc_ckpt_<n>.ckpt`` (Lightning's names). Every one is a complete training state
(weights, optimizer, scheduler, loop counters, callbacks, random state) that loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.errors import CheckpointError, SetupError
from ..utils.io import TMP_SUFFIX, atomic_write
from .reading import load_torch_file

log = logging.getLogger(__name__)

# what a checkpoint needs to resume training (a weights-only save lacks the rest)
TRAINING_STATE_KEYS = ("state_dict", "optimizer_states", "loops", "global_step", "epoch")


def last_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/checkpoints/last.ckpt``: the run's newest training state."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


@dataclass
class LoadedCheckpoint:
    """A checkpoint file's contents, and the identity of the file they were read from."""

    path: Path
    identity: tuple[int, int, int]  # see file_identity
    state: dict[str, Any]

    @classmethod
    def read(cls, path: str | os.PathLike) -> LoadedCheckpoint:
        """Load ``path`` (:func:`~.reading.load_torch_file`). The identity is taken first, so
        that a file replaced during the read does not pass for the one read."""
        identity = file_identity(path)
        return cls(Path(path), identity, load_torch_file(path))

    def is_of(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is still the file these contents were read from."""
        return Path(path).resolve() == self.path.resolve() and file_identity(path) == self.identity


def file_identity(path: str | os.PathLike) -> tuple[int, int, int]:
    """(inode, size, modification time): changes when the file is replaced or rewritten."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


# the checkpoints that a SLURM job writes into the run dir when it requeues itself
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


def next_hpc_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/hpc_ckpt_<n>.ckpt`` with ``n`` one above the run dir's highest (Lightning's
    names for the checkpoints of a requeued SLURM job)."""
    run_dir = Path(run_dir)
    numbers = [_hpc_number(path) for path in run_dir.glob(HPC_CHECKPOINT_GLOB)]
    highest = max((number for number in numbers if number is not None), default=0)
    return run_dir / f"hpc_ckpt_{highest + 1}.ckpt"


def _hpc_number(path: Path) -> int | None:
    suffix = path.stem.removeprefix("hpc_ckpt_")
    return int(suffix) if suffix.isdigit() else None


def save_as_hpc_checkpoint(source: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Make the checkpoint ``source`` the run dir's next ``hpc_ckpt_<n>.ckpt`` (a hard link,
    or a copy where the file system has none), so that a requeued job resumes it."""
    target = next_hpc_checkpoint(run_dir)
    try:
        os.link(source, target)
    except OSError:
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def prune_hpc_checkpoints(keep: str | os.PathLike) -> list[Path]:
    """Delete the ``hpc_ckpt_<n>.ckpt`` beside ``keep`` with a lower ``n``: each requeue
    saves the whole training state, and only the newest is resumed. Returns those deleted."""
    keep = Path(keep)
    newest = _hpc_number(keep)
    deleted = []
    for path in keep.parent.glob(HPC_CHECKPOINT_GLOB):
        number = _hpc_number(path)
        if newest is not None and number is not None and number < newest:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint files, newest first (``checkpoints/*.ckpt``, ``hpc_ckpt_*.ckpt``);
    of two with the same time (file systems that keep whole seconds) the hpc checkpoint, saved
    by a stop after the step checkpoint of that step or later."""
    run_dir = Path(run_dir)
    files = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob(HPC_CHECKPOINT_GLOB)]
    return sorted(
        (path for path in files if path.is_file()),
        key=lambda path: (path.stat().st_mtime_ns, _hpc_number(path) is not None),
        reverse=True,
    )


def load_resume_checkpoint(
    run_dir: str | os.PathLike, newer_than: str | os.PathLike | None = None
) -> LoadedCheckpoint | None:
    """The newest checkpoint of ``run_dir`` that loads as a complete training state, loaded;
    None when the run has no checkpoint. With ``newer_than`` (an existing file), only the run's
    checkpoints at least as new as it, other than it, count.

    Files that fail to load (a crash during a save of another program, a disk error) are
    skipped with a warning; if every one fails, SetupError names them. Temporary files of
    saves that a kill interrupted are removed.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir / "checkpoints", run_dir):
        for stale in folder.glob(f".*.ckpt.*{TMP_SUFFIX}"):
            log.info("removing %s, left by a save that was interrupted", stale)
            stale.unlink(missing_ok=True)
    candidates = run_checkpoints(run_dir)
    if newer_than is not None and Path(newer_than).is_file():
        given = Path(newer_than)
        since = given.stat().st_mtime_ns
        candidates = [
            path for path in candidates
            if path.stat().st_mtime_ns >= since and not path.samefile(given)
        ]  # fmt: skip
    failures = []
    for path in candidates:
        try:
            loaded = LoadedCheckpoint.read(path)
        except CheckpointError as err:
            failures.append(f"{path}: {err}")
            log.warning("resume=auto: skipping %s, which does not load (%s)", path, err)
            continue
        missing = [key for key in TRAINING_STATE_KEYS if key not in loaded.state]
        if missing:
            failures.append(f"{path}: no {', '.join(missing)} (not a training checkpoint)")
            log.warning("resume=auto: skipping %s: it lacks %s", path, ", ".join(missing))
            continue
        return loaded
    if candidates:
        raise SetupError(
            f"resume=auto: none of the {len(candidates)} checkpoints of {run_dir} loads:\n  "
            + "\n  ".join(failures)
            + "\nRemove or replace them, or resume a given file with ckpt_path=PATH"
        )
    return None


__all__ = [
    "LoadedCheckpoint",
    "file_identity",
    "last_checkpoint_path",
    "load_resume_checkpoint",
    "run_checkpoints",
]
