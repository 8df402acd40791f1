"""Checkpoint file names that number epochs as the logs do, from 1."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["EpochCheckpoint"]


class EpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``{epoch}`` in ``filename`` is the number of epochs trained
    (1 after the first), as the epoch log line ("epoch 3/28") and the progress bar count them;
    Lightning's is the 0-based index. Only the name changes: the ``epoch`` stored inside the
    file, which resuming reads, is Lightning's own, and the callback's state is saved under
    ``ModelCheckpoint``'s key, so runs written with either class resume with the other."""

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"{ModelCheckpoint.__qualname__}{kwargs!r}"

    def format_checkpoint_name(
        self,
        metrics: dict[str, Any],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)
