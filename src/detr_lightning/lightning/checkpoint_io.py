"""Lightning's checkpoint IO with crash-safe writes and loads that never unpickle code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ..checkpoints.reading import load_torch_file
from ..checkpoints.run_files import LoadedCheckpoint
from ..utils.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with crash-safe writes and loads that never unpickle code.

    A local checkpoint is written to a temporary file in its own directory, flushed to disk and
    renamed over the target (:func:`~detr_lightning.utils.io.atomic_write`), so a kill during a save
    leaves the previous file intact; Lightning's own writer goes through a temporary file in
    the system's temp directory, whose move to another file system is a plain copy. Loads use
    ``weights_only=True`` whatever the caller asks.

    ``train`` reads the checkpoint it resumes to choose and check it, and hands the contents
    over (:meth:`hand_over`) so that Lightning's load does not read the file again: a DETR-R50
    training state is about 500 MB, read by every process of a run, often from a shared file
    system.
    """

    _handed: LoadedCheckpoint | None = None  # for the next load_checkpoint, once

    def hand_over(self, loaded: LoadedCheckpoint) -> None:
        """Give the next :meth:`load_checkpoint` the contents ``loaded`` instead of reading
        the file, if it loads that same file and the file has not changed since it was read.
        Whatever it loads, the next load takes the contents away."""
        self._handed = loaded

    def forget(self) -> None:
        """Drop contents handed over and not loaded (a run that failed before its restore)."""
        self._handed = None

    def __getstate__(self) -> dict[str, Any]:
        # a process started by pickling the trainer (ddp_spawn) reads the file itself
        return {**self.__dict__, "_handed": None}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        handed, self._handed = self._handed, None
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if handed is not None and handed.is_of(path):
            return handed.state
        return load_torch_file(path)
