"""Learning-rate schedules, as Lightning scheduler configs built from torch's schedulers.

Each takes the optimizer and ``total_steps`` (optimizer steps of the whole run, which
``DETRModule.configure_optimizers`` supplies) and returns Lightning's
``{"scheduler", "interval", "name"}`` dict. Configs name them with ``_target_`` and
``_partial_: true``; every other argument is a config key.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR, StepLR


def step_lr(
    optimizer: Optimizer, *, total_steps: int, lr_drop: int, gamma: float
) -> dict[str, Any]:
    """The paper's schedule: every learning rate times ``gamma`` after each ``lr_drop`` epochs.

    ``total_steps`` is not needed: the schedule counts epochs.
    """
    scheduler = StepLR(optimizer, step_size=lr_drop, gamma=gamma)
    return {"scheduler": scheduler, "interval": "epoch", "name": "lr"}


def warmup_cosine(optimizer: Optimizer, *, total_steps: int, warmup_steps: int) -> dict[str, Any]:
    """Linear warmup over ``warmup_steps`` optimizer steps, then cosine decay to 0 at the end."""
    warmup_steps = int(warmup_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=max(int(total_steps) - warmup_steps, 1))
    if warmup_steps <= 0:
        return {"scheduler": cosine, "interval": "step", "name": "lr"}
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    scheduler = SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
    return {"scheduler": scheduler, "interval": "step", "name": "lr"}


__all__ = ["step_lr", "warmup_cosine"]
