"""How DETR is optimized: parameter groups (the backbone at its own learning rate), the
optimizer from its config spec (fused where torch has the kernel), and the learning-rate
schedules.

Schedules take the optimizer and ``total_steps`` (optimizer steps of the whole run, which
:func:`build_optimization` supplies) and return Lightning's ``{"scheduler", "interval",
"name"}`` dict. Configs name them with ``_target_`` and ``_partial_: true``; every other
argument is a config key.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR, StepLR

from .specs import build

log = logging.getLogger(__name__)


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


def parameter_groups(model: nn.Module, backbone_lr: float | None) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in two groups: ``transformer_and_heads`` (the
    optimizer's own learning rate) and ``backbone`` (at ``backbone_lr``; left out when the
    backbone has nothing to train). ``backbone_lr`` None (a backbone module of one's own,
    without an ``lr``): one group, everything at the optimizer's learning rate."""
    if backbone_lr is None:
        params = [param for param in model.parameters() if param.requires_grad]
        return [{"params": params, "name": "all"}]
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    groups = [{"params": rest, "name": "transformer_and_heads"}]
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr, "name": "backbone"})
    return groups


def build_optimizer(
    groups: list[dict[str, Any]], spec: Mapping[str, Any] | None, *, allow_fused: bool = True
) -> Optimizer:
    """The optimizer of ``spec`` (a ``_partial_`` config spec; None: AdamW, lr 1e-4, weight
    decay 1e-4, as the paper) over ``groups``, with its fused kernel where
    :func:`fused_by_default` says so and ``allow_fused`` (Lightning cannot clip the gradients
    of a fused optimizer under fp16's loss scaling)."""
    factory = (
        functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4)
        if spec is None
        else build(spec)
    )
    params = [p for group in groups for p in group["params"]]
    fused = fused_by_default(factory, params) if allow_fused else {}
    try:
        # copies: an optimizer fills its groups with its settings (``fused`` among them)
        # before it may refuse them, and the retry below must not inherit them
        optimizer = factory([dict(group) for group in groups], **fused)
    except (RuntimeError, ValueError) as err:
        if not fused:
            raise
        # an optimizer that takes ``fused`` but has no such kernel for this device; an
        # error of its own (a bad lr) comes again from this call
        optimizer = factory(groups)
        log.info(f"optimizer: no fused kernel here ({err}); torch's default update")
    else:
        if fused:
            log.info("optimizer: fused kernel (optimizer.fused=false for torch's default)")
    return optimizer


def build_schedule(
    spec: Mapping[str, Any], optimizer: Optimizer, total_steps: int
) -> dict[str, Any]:
    """The Lightning scheduler config of ``spec`` (a ``_partial_`` spec of one of this module's
    schedules) for ``optimizer``."""
    return build(spec)(optimizer, total_steps=int(total_steps))


def fused_by_default(factory: Callable, params: Sequence[Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when ``factory`` (an optimizer class or a partial of one) can fuse
    its update into one kernel, every parameter is on a CUDA device or on the CPU (all on one
    kind) and the config chose neither ``fused`` nor ``foreach``; else ``{}`` (torch's own
    default).

    On CUDA torch defaults to its multi-tensor (foreach) update; the fused kernel computes the
    same AdamW step in fewer launches and passes over the weights (``bench/train_step.py``).
    On the CPU torch defaults to a Python loop of a dozen operations per parameter: for the
    12M parameters (88 tensors) of ``bench/train_speed.py``'s small DETR, one AdamW step took 52-64
    ms that way, 50-54 ms with foreach and 11 ms fused on a 2-core CPU, of a training step of
    about 560 ms. The fused step differs from the loop by float32 rounding only (6e-8 after
    33 steps). ``optimizer.fused=false`` keeps torch's default."""
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return {}
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        accepts = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    kinds = {p.device.type for p in params}
    if not accepts or len(kinds) != 1 or kinds.isdisjoint({"cuda", "cpu"}):
        return {}
    if any(not p.is_floating_point() for p in params):
        return {}
    return {"fused": True}


__all__ = [
    "build_optimizer",
    "build_schedule",
    "fused_by_default",
    "parameter_groups",
    "step_lr",
    "warmup_cosine",
]
