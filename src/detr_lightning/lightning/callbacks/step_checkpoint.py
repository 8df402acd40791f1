"""The latest training state every n optimizer steps, never at an epoch's last batch."""

from __future__ import annotations

from pytorch_lightning.callbacks import ModelCheckpoint

from .. import compat

__all__ = ["StepCheckpoint"]


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` that skips an epoch's last batch.

    Lightning resumes a checkpoint written at an epoch's last batch as one written after that
    epoch's validation: it skips the validation and the end-of-epoch hooks. Such a step
    checkpoint is written before them, so a run resumed from it (the epoch checkpoint turned
    off, or not yet written) lost that epoch's validation and its metrics.json entry. The
    epoch's end is saved after its validation by the epoch checkpoint (``last_checkpoint``);
    skipping the step save there also spares a second write of the same state.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if compat.is_last_batch(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
