"""An exponential moving average of the weights, and early stopping: both off unless the
config turns them on (``callbacks.ema.decay``, ``callbacks.early_stopping.patience``)."""

from __future__ import annotations

import math

import torch
from pytorch_lightning.callbacks import EarlyStopping, WeightAveraging
from torch import Tensor

__all__ = ["EMA", "early_stopping", "ema"]


class EMA(WeightAveraging):
    """EMA of the weights through Lightning's :class:`WeightAveraging`, with a warm-up.

    After each optimizer step ``t`` (counted from ``start_step``) every parameter and floating
    buffer moves to ``average + (1 - d_t) (current - average)`` with
    ``d_t = decay (1 - exp(-t / warmup_steps))``: the first averages follow the fast-moving
    early weights closely, later ones average over about ``1 / (1 - decay)`` steps. Integer
    buffers (BatchNorm's step counters) are copied.

    Lightning's callback does the rest: validation runs on the averaged weights (so the best
    checkpoint is chosen by them), checkpoints hold them as their ``state_dict`` (evaluation,
    ``load_pretrained`` and exports read them) and the training weights under
    ``current_model_state`` with the average's state, so a resumed run continues both
    exactly; when training ends the model keeps the averaged weights.

    Args:
        decay: the average's decay per step after warm-up (e.g. 0.9997).
        warmup_steps: steps over which the decay rises to ``decay`` (0: ``decay`` at once).
        start_step: the optimizer step (0-based) of the first update.
        every_n_steps: update after every n-th optimizer step.
    """

    def __init__(
        self,
        decay: float = 0.9997,
        warmup_steps: int = 1000,
        start_step: int = 0,
        every_n_steps: int = 1,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}: must be in (0, 1), e.g. 0.9997")
        if warmup_steps < 0 or start_step < 0 or every_n_steps < 1:
            raise ValueError(
                "callbacks.ema: warmup_steps and start_step must be >= 0, every_n_steps >= 1"
            )
        super().__init__(use_buffers=True, multi_avg_fn=self._average)
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.start_step = int(start_step)
        self.every_n_steps = int(every_n_steps)
        self._decay_now = 0.0

    def decay_at(self, step_idx: int) -> float:
        """The decay used for the update after 0-based optimizer step ``step_idx``."""
        steps = step_idx - self.start_step + 1
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-steps / self.warmup_steps))

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or step_idx < self.start_step:
            return False
        if (step_idx - self.start_step) % self.every_n_steps:
            return False
        # read by _average, which AveragedModel calls from this same update; a host number,
        # so that the update reads nothing back from the device
        self._decay_now = self.decay_at(step_idx)
        return True

    def _average(self, averaged: list[Tensor], current: list[Tensor], _count: Tensor) -> None:
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats],
                                 1.0 - self._decay_now)  # fmt: skip
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)


def ema(decay: float | None = None, **settings) -> EMA | None:
    """The ``callbacks.ema`` node: an :class:`EMA` when ``decay`` is set, None (off) when not."""
    return None if decay is None else EMA(decay, **settings)


def early_stopping(
    patience: int | None = None, monitor: str = "val/map", mode: str = "max", **settings
) -> EarlyStopping | None:
    """The ``callbacks.early_stopping`` node: Lightning's :class:`EarlyStopping` on
    ``monitor`` when ``patience`` (validations without improvement) is set, None (off) when
    not."""
    if patience is None:
        return None
    return EarlyStopping(monitor=monitor, mode=mode, patience=int(patience), **settings)
