"""Callbacks of the training entry point: per-epoch history, metrics.json, curves, summaries,
and the checkpoints written when a run stops early (SIGTERM, a loss that stays non-finite).

They read validation results from Lightning's logged metrics (``val/map``, ...), the same values
every logger and ``ModelCheckpoint`` sees.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.utilities.exceptions import SIGTERMException

from . import host_memory
from .errors import TrainingStopped
from .evaluation import max_detections, metric_keys, metrics_payload, result_from_metrics
from .io import write_json_atomic

log = logging.getLogger(__name__)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class MetricsHistory(pl.Callback):
    """Keeps one entry per epoch and writes ``metrics.json`` (and a PNG of the curves).

    Each entry holds ``epoch``, ``train_loss`` (epoch mean of the weighted total loss over all
    ranks), ``train_stand_in_images`` (samples that replaced unreadable images, all ranks),
    ``train_seconds`` (training batches only, validation excluded),
    ``train_images_per_s`` (all ranks together), ``peak_memory_mb`` (CUDA: peak allocated on
    rank 0 during the epoch; CPU: the process's peak RSS so far) and the epoch's validation
    metrics. The file is rewritten after every epoch, so a crashed run keeps its history.
    """

    def __init__(self, output_dir: str | os.PathLike, plot: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.plot = plot
        self.history: list[dict[str, Any]] = []
        self.final_metrics: dict[str, float] = {}
        self._epoch_start = 0.0
        self._train_stop: float | None = None
        self._images = 0
        self._val_metrics: dict[str, float] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # plain floats and lists: checkpoints load with weights_only=True
        return {"history": self.history, "final_metrics": self.final_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.final_metrics = dict(state_dict.get("final_metrics", {}))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch continues that epoch without on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._train_stop = None
        self._images = 0
        self._val_metrics = {}
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch is not None:
            self._images += len(batch[2])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._train_stop is None and trainer.training:
            self._train_stop = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = result_from_metrics(trainer.callback_metrics, "val")
        if "map" in metrics:
            self.final_metrics = metrics
            # the history keeps the 12 statistics and counts; per-class AP only for the last
            keep = (*metric_keys(_max_dets(pl_module)), "num_images", "skipped_images")
            self._val_metrics = {k: metrics[k] for k in keep if k in metrics}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stop = self._train_stop or time.perf_counter()
        seconds = max(stop - self._epoch_start, 1e-9)
        images = trainer.strategy.reduce(
            torch.tensor(float(self._images), device=pl_module.device), reduce_op="sum"
        )
        loss = trainer.callback_metrics.get("train/loss")
        stand_ins = trainer.callback_metrics.get("train/stand_in_images")
        entry = {
            "epoch": trainer.current_epoch,
            "train_loss": float(loss) if loss is not None else math.nan,
            "train_stand_in_images": int(stand_ins) if stand_ins is not None else 0,
            "train_seconds": seconds,
            "train_images_per_s": float(images) / seconds,
            "peak_memory_mb": _peak_memory_mb(pl_module.device),
            **self._val_metrics,
        }
        self.history.append(entry)
        if trainer.is_global_zero:
            self.write(getattr(pl_module, "label_map", None))
            log.info(_summary_line(entry, trainer.max_epochs))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(getattr(pl_module, "label_map", None))
            if self.plot and self.history:
                plot_history(self.history, self.output_dir / "curves.png")

    def write(self, label_map: dict[str, Any] | None = None) -> None:
        """Write metrics.json now (rank 0 calls this after every epoch): the last evaluation
        (see :func:`~detr_lightning.evaluation.metrics_payload`) and the history."""
        payload = metrics_payload(self.final_metrics, label_map) if self.final_metrics else {}
        payload["history"] = self.history
        write_json_atomic(self.output_dir / "metrics.json", payload)


def _max_dets(pl_module: pl.LightningModule) -> int:
    return max_detections(getattr(getattr(pl_module, "model", None), "num_queries", 100))[-1]


def _summary_line(entry: dict[str, Any], max_epochs: int | None) -> str:
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    line = (
        f"epoch {entry['epoch'] + 1}{total} | train loss {entry['train_loss']:.4f} | "
        f"{entry['train_images_per_s']:.1f} img/s | {entry['train_seconds']:.1f} s | "
        f"peak {entry['peak_memory_mb']:.0f} MB"
    )
    if "map" in entry:
        line += f" | val map {entry['map']:.4f} map_50 {entry['map_50']:.4f}"
    return line


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation mAP per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [entry["epoch"] + 1 for entry in history]
    figure, (loss_axis, map_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(epochs, [entry["train_loss"] for entry in history], marker="o", ms=3)
    loss_axis.set(title="training loss (weighted total)", xlabel="epoch", ylabel="loss")
    loss_axis.grid(alpha=0.3)
    val = [entry for entry in history if "map" in entry]
    if val:
        for key in ("map", "map_50", "map_75"):
            map_axis.plot([e["epoch"] + 1 for e in val], [e[key] for e in val], marker="o", ms=3,
                          label=key)  # fmt: skip
        map_axis.legend()
    map_axis.set(title="validation COCO mAP", xlabel="epoch", ylabel="AP", ylim=(0, 1))
    map_axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


class ReuseFreedMemory(pl.Callback):
    """Sets malloc to keep freed memory for reuse (:mod:`~detr_lightning.host_memory`) in every
    process of a CPU run, at ``setup``: a rank that the launcher starts afresh (``ddp_spawn``)
    runs no entry-point code before that, and the data-loader workers are forked after it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.accelerator, CPUAccelerator):
            host_memory.reuse_freed_memory()


class SigtermCheckpoint(pl.Callback):
    """Saves ``path`` (the run's last.ckpt) when the run stops on SIGTERM.

    Lightning's own handler notes a SIGTERM and stops after the batch in progress (all ranks
    together) by raising ``SIGTERMException``; this callback saves the state there, so a
    restart with ``resume=auto`` loses no step. With ``accumulate_grad_batches`` > 1 that
    batch may be one of the several that an optimizer step sums: their gradients would be lost
    and the resumed step would sum only the rest, so the stop waits for the step's last batch.
    Other exceptions save nothing: their state may be half-way through a step.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._held = False  # a SIGTERM noticed between the accumulated batches of a step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning's own flag and accumulation test (private: without them, stop as it does)
        connector = getattr(trainer, "_signal_connector", None)
        accumulating = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
        if connector is None or accumulating is None:
            return
        if accumulating():
            if connector.received_sigterm:
                connector.received_sigterm, self._held = False, True
        elif self._held:
            connector.received_sigterm, self._held = True, False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: stopped at global step %d and saved %s; to continue, run the same "
                "command with resume=auto (and run_dir=%s if it does not name the run dir)",
                trainer.global_step,
                self.path,
                trainer.default_root_dir,
            )


class NonFiniteStop(pl.Callback):
    """Stops the run after ``max_consecutive`` training steps in a row were skipped because the
    loss or the gradients were NaN/Inf, with a checkpoint of the last good state.

    :class:`~detr_lightning.module.DETRModule` skips such steps on every rank (the weights,
    optimizer and BatchNorm statistics stay as they were) and counts them in
    ``nonfinite_streak``; this callback ends the run when the count reaches the limit. The state
    saved to ``path`` is therefore the one after the last finite step (it is not saved if the
    weights themselves are no longer finite). Raises TrainingStopped.
    """

    def __init__(self, max_consecutive: int, path: str | os.PathLike) -> None:
        if int(max_consecutive) < 1:
            raise ValueError(
                f"nonfinite.max_consecutive={max_consecutive}: give a number of steps >= 1 "
                "(null never stops the run)"
            )
        self.max_consecutive = int(max_consecutive)
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "nonfinite_streak", 0) < self.max_consecutive:
            return
        state = [*pl_module.parameters(), *pl_module.buffers()]
        finite = all(bool(torch.isfinite(t).all()) for t in state if t.is_floating_point())
        if finite:
            trainer.save_checkpoint(self.path, weights_only=False)
            saved = f"saved the last good state (weights before these steps) to {self.path}"
        else:
            saved = f"the weights are no longer finite, so nothing was saved; {self.path} is older"
        images = getattr(pl_module, "nonfinite_images", [])
        raise TrainingStopped(
            f"the loss or its gradients were NaN/Inf in {self.max_consecutive} consecutive "
            f"training steps (up to global step {trainer.global_step}; last images {images}); "
            f"{saved}. Check those images and their annotations (or set "
            "trainer.gradient_clip_val), then continue with resume=auto, or start anew with a "
            "lower optimizer.lr; nonfinite.max_consecutive sets the limit"
        )
