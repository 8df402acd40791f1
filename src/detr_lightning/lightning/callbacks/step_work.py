"""The host's work per training step: operators dispatched and host syncs, counted over each
whole iteration of the training loop (:mod:`detr_lightning.utils.host_work`).

Add it to a run to see what a step costs the host on any machine:
``detr-train ... +callbacks.step_work._target_=detr_lightning.lightning.callbacks.StepWork``;
it logs the counts of each step it measured at the end of the fit, and the benchmark
``bench/train_step.py --count`` reports them.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from typing import Any

import pytorch_lightning as pl

from ...utils.host_work import HostWorkCounter

log = logging.getLogger(__name__)

__all__ = ["StepWork"]


class StepWork(pl.Callback):
    """Counts each training step's operators and host syncs, from one training batch's start
    to the next's, or to the epoch's end or a validation (so the step's logging and callbacks
    count, and the loading of the next batch in the main process with ``data.num_workers=0``),
    skipping the first ``warmup`` steps.

    ``steps`` holds, per counted step, ``operators`` and ``syncs`` (totals),
    ``sync_kinds`` (syncs by kind) and ``boundary``: whether the window ended at an epoch's
    end, a validation or the fit's end, whose once-per-epoch work (epoch means, history,
    checkpoints) it then holds too. :meth:`summary` gives the medians over the other steps
    (over all when there are no others) and the operators that a step runs most.
    """

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = int(warmup)
        self.steps: list[dict[str, Any]] = []
        self.operators: Counter[str] = Counter()  # summed over the counted steps
        self._counter: HostWorkCounter | None = None
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close(boundary=False)
        self._seen += 1
        if self._seen > self.warmup:
            self._counter = HostWorkCounter(device_type=pl_module.device.type)
            self._counter.__enter__()

    # a step's window ends before the validation and the epoch's end, which are no step's work
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self.steps and trainer.is_global_zero:
            summary = self.summary()
            log.info(
                "host work per training step (median of %d): %d operators, %d host syncs %s",
                len(self.steps), summary["operators"], summary["syncs"], summary["sync_kinds"],
            )  # fmt: skip

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self, boundary: bool = True) -> None:
        counter, self._counter = self._counter, None
        if counter is None:
            return
        counter.__exit__(None, None, None)
        self.steps.append(
            {
                "operators": counter.num_operators,
                "syncs": counter.num_syncs,
                "sync_kinds": dict(counter.syncs),
                "boundary": boundary,
            }
        )
        self.operators.update(counter.operators)

    def summary(self, top: int = 15) -> dict[str, Any]:
        """Medians over the counted steps (those inside an epoch, where there are any), and
        the ``top`` operators by count per step (over all counted steps)."""
        count = len(self.steps)
        steps = [step for step in self.steps if not step["boundary"]] or self.steps
        kinds = sorted({kind for step in steps for kind in step["sync_kinds"]})
        return {
            "steps": count,
            "steps_in_medians": len(steps),
            "operators": statistics.median(step["operators"] for step in steps),
            "syncs": statistics.median(step["syncs"] for step in steps),
            "sync_kinds": {
                kind: statistics.median(step["sync_kinds"].get(kind, 0) for step in steps)
                for kind in kinds
            },
            "top_operators": {
                name: total / count for name, total in self.operators.most_common(top)
            },
        }
