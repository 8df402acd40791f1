"""Tiny Hydra configs for the training-pipeline tests (CPU, seconds per epoch)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import detr_lightning.cli.config  # noqa: F401  (the configs' ${detr.run_dir:...} resolver)
from helpers import CONF_DIR as _CONF_DIR
from helpers.models import TINY_MODEL as TINY_MODEL_SPEC

CONF_DIR = str(_CONF_DIR)

# The tiny DETR of helpers.models (ResNet-18, 32-wide transformer) as config overrides, set
# up to train from scratch (a random GroupNorm backbone, every stage trained) with 8 queries,
# two heads and dropout.
TINY_TRAINING = {"nheads": 2, "num_queries": 8, "dropout": 0.1}
TINY_MODEL = [
    f"backbone={TINY_MODEL_SPEC['backbone']['name']}",
    "backbone.pretrained=false",
    "backbone.norm=group",
    "backbone.trainable_layers=5",
    "backbone.lr=1e-4",
    "model=detr_small",
    *(
        f"model.{key}={value}"
        for key, value in {**TINY_MODEL_SPEC, **TINY_TRAINING}.items()
        if key not in ("_target_", "backbone", "num_classes")  # classes: from the data
    ),
]

TINY_DATA = [
    "data=synthetic",
    "data.num_workers=0",
    "data.batch_size=4",
    "data.scales=[64,80]",
    "data.max_size=128",
    "data.crop_resize=[64,80]",
    "data.crop_min=48",
    "data.crop_max=64",
    "data.val_size=80",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "data.synthetic.min_size=64",
    "data.synthetic.max_size=96",
    "data.synthetic.num_categories=3",
]

TINY_TRAINER = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks=none",
]


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_MODEL, *TINY_DATA, *TINY_TRAINER, f"run_dir={run_dir}", *extra]


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<name>.yaml`` as the entry points do (``run_dir`` must be overridden)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


class SignalOnce(pl.Callback):
    """Sends the signal ``name`` (``TERM``, ``USR2``) after global step ``step``, in the first
    run that gets there: the file ``marker`` records it, so that the resumed run trains on. It
    goes to this process, or with ``to=parent`` to the one that started it (a launcher such as
    torchrun); with ``rank`` only that global rank sends it. For runs that tests start through
    Hydra (``+callbacks.x._target_=helpers.pipeline.SignalOnce``)."""

    def __init__(self, step: int, marker: str, name: str = "TERM", to: str = "self",
                 rank: int | None = None) -> None:  # fmt: skip
        if to not in ("self", "parent"):
            raise ValueError(f"to={to!r}: self or parent")
        self.step, self.marker, self.to, self.rank = int(step), Path(marker), to, rank
        self.signum = signal.Signals[f"SIG{name.upper()}"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid() if self.to == "self" else os.getppid(), self.signum)


class RecordBatches(pl.Callback):
    """Records every training step's loss and image ids, and saves a checkpoint at the end of
    step ``save_at`` (as the every-N-steps checkpoint does)."""

    def __init__(self, save_at: int | None = None, path: Path | None = None) -> None:
        self.save_at, self.path = save_at, path
        self.steps: list[tuple[float, list[int]]] = []
        self.global_steps: list[int] = []  # the trainer's, after each batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = [int(target["image_id"]) for target in batch[2]]
        self.steps.append((float(outputs["loss"]), ids))
        self.global_steps.append(trainer.global_step)
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)

    @property
    def losses(self) -> list[float]:
        return [loss for loss, _ in self.steps]
