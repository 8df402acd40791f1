"""Host memory settings that every process of a run must make for itself."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.accelerators import CPUAccelerator

from ...utils import host_memory

__all__ = ["ReuseFreedMemory"]


class ReuseFreedMemory(pl.Callback):
    """Sets malloc to keep freed memory for reuse (:mod:`~detr_lightning.utils.host_memory`) in
    every process of a CPU run, at ``setup``: a rank that the launcher starts afresh (``ddp_spawn``)
    runs no entry-point code before that, and the data-loader workers are forked after it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.accelerator, CPUAccelerator):
            host_memory.reuse_freed_memory()
