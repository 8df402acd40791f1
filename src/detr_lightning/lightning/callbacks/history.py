"""The run's history: one entry per epoch in ``metrics.json`` (training loss, speed, memory,
the epoch's validation statistics), a log line per epoch, and the curves as a PNG.

It reads validation results from Lightning's logged metrics (``val/map``, ...), the same values
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

from ...evaluation.evaluator import max_detections, metric_keys
from ...evaluation.report import metrics_payload, result_from_metrics
from ...utils.io import write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["MetricsHistory", "plot_history"]


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
        # DETRModule's own epoch sums, which a run resumed mid-epoch restores (every rank
        # calls this); other modules' epoch means as Lightning logged them
        epoch_means = getattr(pl_module, "training_epoch_means", None)
        if epoch_means is not None:
            means = {f"train/{name}": value for name, value in epoch_means().items()}
        else:
            means = trainer.callback_metrics
        loss, stand_ins = means.get("train/loss"), means.get("train/stand_in_images")
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
        (see :func:`~detr_lightning.evaluation.report.metrics_payload`) and the history."""
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
