"""How a run uses its hardware: the precision ``auto`` resolves to, ``torch.compile``, and
oneDNN's cache of CPU kernels."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..utils.errors import SetupError
from .module import DETRModule

__all__ = ["compile_model", "limit_cpu_kernel_cache", "resolve_precision"]

log = logging.getLogger(__name__)


def resolve_precision(trainer: Mapping[str, Any], stage: str = "fit") -> Any:
    """``trainer.precision``, with ``auto`` resolved for the device the run will use.

    ``auto`` is ``bf16-mixed`` for training on CUDA GPUs with bf16 arithmetic (compute
    capability 8.0 and up: A100, H100, RTX 30xx and later), where it trained 1.10-1.35x
    faster than fp32 with 0.65x the peak memory at the paper config on an H200
    (``bench/train_step.py``); matching, the losses and the prediction heads run in float32
    under it. Validation during training and ``test_after_fit`` run in the
    training's precision. Everywhere else, and for evaluation by ``eval.py`` on any device (COCO
    figures comparable with fp32 results), ``auto`` is ``32-true``; so it is with fork-based
    strategies (``ddp_fork``, ``ddp_notebook``), where reading the GPU's capability first would
    start CUDA before the fork. Any other value is Lightning's, unchanged."""
    precision = trainer.get("precision")
    if str(precision) != "auto":
        return precision
    strategy = str(trainer.get("strategy"))
    if "fork" in strategy or "notebook" in strategy:
        # reading the GPU's capability would start CUDA before the workers fork, which breaks them
        log.info(
            "trainer.precision=auto is 32-true with strategy=%s: set trainer.precision=bf16-mixed "
            "for bf16",
            strategy,
        )
        return "32-true"
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if stage == "fit" and on_cuda and torch.cuda.get_device_capability() >= (8, 0):
        return "bf16-mixed"
    return "32-true"


def compile_model(module: DETRModule, setting: Any) -> None:
    """``torch.compile`` the module's DETR in place (``nn.Module.compile``: the state dict and
    checkpoints keep their keys) when ``setting`` (the ``compile`` config key) is true or a
    mapping of ``torch.compile`` arguments (e.g. ``{mode: max-autotune}``); false/null: eager.

    Compilation specializes on input shapes: multi-scale batches of new sizes recompile until
    Dynamo switches to dynamic shapes, so the gain shows in long runs, not in the first steps
    (``bench/train_step.py`` measures both)."""
    if setting is None or setting is False:
        return
    if setting is True:
        options: dict[str, Any] = {}
    elif isinstance(setting, Mapping):
        options = dict(setting)
    else:
        raise SetupError(
            f"compile={setting!r}: use true, false, or a mapping of torch.compile arguments "
            "such as {mode: max-autotune}"
        )
    log.info("compiling the model with torch.compile(%s)", options or "")
    module.model.compile(**options)


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_cpu_kernel_cache(capacity: Any) -> None:
    """Bound oneDNN's cache of compiled CPU kernels (``cpu_kernel_cache`` in train.yaml).

    oneDNN compiles a kernel ("primitive") per convolution shape and keeps up to 1024 of them.
    Multi-scale training brings new shapes nearly every batch, so the cache seldom hits and its
    kernels pile up in the training process: one epoch of ``bench/train_speed.py``'s CPU config
    peaked at 1392-1400 MB with no cache against 1509-1591 MB with oneDNN's default, for 2-3%
    of speed (kernels shared by same-shape convolutions in a step are compiled again). oneDNN
    reads its environment variable once, at its first kernel, so this takes effect when it runs
    before the process's first CPU convolution (as in ``train``); a value set in the
    environment wins. ``None`` leaves oneDNN's default.
    """
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise SetupError(
            f"cpu_kernel_cache must be a number of kernels >= 0 (0: no cache) or null, got "
            f"{capacity!r}"
        )
    configured = os.environ.get(ONEDNN_CACHE_VARIABLE)
    if configured is None:
        os.environ[ONEDNN_CACHE_VARIABLE] = str(capacity)
    elif configured != str(capacity):
        log.info(
            "oneDNN kernel cache: %s=%s from the environment, not cpu_kernel_cache=%d",
            ONEDNN_CACHE_VARIABLE, configured, capacity,
        )  # fmt: skip
