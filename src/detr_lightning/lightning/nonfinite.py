"""Training steps whose loss or gradients are NaN/Inf: skipped on every rank together
(:class:`NonFiniteSkip`, part of DETRModule), and the run stopped with its last good state
after too many in a row (:class:`NonFiniteStop`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from ..ops.distributed import gather_to_main
from ..utils.errors import TrainingStopped

log = logging.getLogger(__name__)

__all__ = ["NonFiniteSkip", "NonFiniteStop", "loss_scaler"]


def loss_scaler(trainer: pl.Trainer) -> Any:
    """The gradient scaler of fp16 mixed precision, or None."""
    return getattr(trainer.precision_plugin, "scaler", None)


class NonFiniteSkip(pl.LightningModule):
    """Skips, on every rank alike, a training step whose predictions, loss or gradients are
    NaN/Inf, leaving weights, optimizer and BatchNorm statistics as they were.

    Under DDP every rank must run the backward pass and its gradient all-reduce, so a skipped
    step backpropagates zero (:meth:`_skipped`: Lightning refuses a None under DDP) and
    :meth:`on_before_optimizer_step` drops the update. The module's ``training_step`` calls
    :meth:`_start_step` first and :meth:`_skipped` for a step it finds non-finite; gradients
    are checked in :meth:`configure_gradient_clipping`. ``nonfinite_streak`` counts the steps
    skipped in a row and ``nonfinite_images`` names the last one's images, for
    :class:`NonFiniteStop`.

    Reading a device value on the host makes the host wait for the device, so the loss is
    checked with the gradients where it can be (:meth:`_check_with_gradients`): one read per
    step decides both, and what the step records (its losses' epoch sums) is recorded once the
    step is known to be kept.
    """

    def _init_nonfinite(self) -> None:
        self.nonfinite_streak = 0
        self.nonfinite_images: list[int] = []
        self._step_images: list[int] = []
        self._skipping = False  # the current step is skipped: drop its (zero) update
        self._running_stats: list[tuple[Tensor, Tensor]] = []
        self._step_loss: Tensor | None = None  # checked with the gradients
        self._on_kept: Callable[[], None] | None = None

    def _start_step(self, targets: Sequence[dict[str, Any]]) -> None:
        """Note the batch's image ids and keep the BatchNorm statistics the step may change."""
        self._step_images = [int(target["image_id"]) for target in targets]  # host ints
        self._step_loss, self._on_kept = None, None
        self._save_running_stats()

    def _loss_checked_with_gradients(self) -> bool:
        """Whether a finite-looking step's loss can wait to be checked with its gradients: under
        native precision (fp32, bf16-mixed; DDP included), without fp16's loss scaler (which
        skips inf gradients by itself) and without gradient accumulation (whose batches that
        do not step reach no gradient check)."""
        trainer = self.trainer
        native = type(trainer.precision_plugin) in (Precision, MixedPrecision)
        return native and loss_scaler(trainer) is None and trainer.accumulate_grad_batches == 1

    def _check_loss(self, loss: Tensor, record: Callable[[], None]) -> Tensor | None:
        """Check the step's weighted total ``loss``, and run ``record`` (what the step logs)
        if it is kept. The zero stand-in of :meth:`_skipped` if the loss is NaN/Inf on any
        rank now; None if the step goes on, with the check and ``record`` left to
        :meth:`configure_gradient_clipping` where :meth:`_loss_checked_with_gradients`."""
        if self._loss_checked_with_gradients():
            self._step_loss, self._on_kept = loss.detach(), record
            return None
        nonfinite = ~torch.isfinite(loss.detach())
        if self._any_rank(nonfinite):
            reason = f"the loss is {float(loss.detach())}"
            return self._skipped(reason if bool(nonfinite) else None)
        record()
        return None

    def _record_unchecked(self) -> None:
        """After the step: a loss left to the gradient check that no check reached (a hook path
        without gradient clipping) is checked here, on the host."""
        record, loss = self._on_kept, self._step_loss
        self._on_kept, self._step_loss = None, None
        if record is not None and loss is not None and bool(torch.isfinite(loss)):
            record()

    def _any_rank(self, flag: Tensor | bool) -> bool:
        """Whether ``flag`` is true on any rank (the ranks decide together). Every rank must
        call it."""
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=False))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the update of a skipped step (:meth:`training_step`); gradients that are NaN/Inf
        are found in :meth:`configure_gradient_clipping`."""
        if self._skipping:
            self._skipping = False
            optimizer.zero_grad(set_to_none=True)  # an optimizer leaves gradient-less weights

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Skip a step whose gradients are NaN/Inf, and clip the others: one total norm serves
        both (``torch.nn.utils.clip_grad_norm_`` computes the same norm and clips with it).

        The gradients are already all-reduced, so every rank sees the same ones and decides
        alike. Under fp16 mixed precision the gradient scaler skips inf gradients itself and
        Lightning clips. Lightning's mixed-precision plugin refuses to clip for any fused
        optimizer, because under fp16 such an optimizer unscales the gradients itself, so they
        would be clipped while still scaled; bf16 scales nothing, so here a fused optimizer is
        clipped under bf16-mixed too. Strategies with their own precision plugin (FSDP) decide
        the skip on all ranks together and clip as Lightning does; DeepSpeed keeps its gradients
        to itself (``p.grad`` is None), so it is neither checked nor clipped here.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]  # fmt: skip
        if not params:  # a skipped step
            return
        plugin = self.trainer.precision_plugin
        if loss_scaler(self.trainer) is not None:
            self.nonfinite_streak = 0
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        native = type(plugin) in (Precision, MixedPrecision)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        nonfinite = ~torch.isfinite(total)
        loss, record = self._step_loss, self._on_kept
        self._step_loss, self._on_kept = None, None
        if loss is not None:  # one read decides for the loss and the gradients
            nonfinite = nonfinite | ~torch.isfinite(loss)
            if self.trainer.world_size > 1:  # the gradients are alike on every rank, not the loss
                nonfinite = self.trainer.strategy.reduce(nonfinite.float(), reduce_op="sum") > 0
        # sharded gradients (FSDP) differ between ranks: decide together there
        if bool(nonfinite) if native else self._any_rank(nonfinite):
            self._note_skip(_reason(loss, total))
            optimizer.zero_grad(set_to_none=True)
            return
        if record is not None:
            record()
        self.nonfinite_streak = 0
        if gradient_clip_val is None or gradient_clip_val <= 0:  # Lightning's "off"
            return
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        if not native:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif algorithm == GradClipAlgorithmType.NORM:
            torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), total)
        else:
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))

    def _save_running_stats(self) -> None:
        """Copy the BatchNorm running statistics that this step's forward pass will update."""
        self._running_stats = [
            (buffer, buffer.detach().clone())
            for module in self.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None
        ]

    def _skipped(self, reason: str | None) -> Tensor:
        """The zero loss that stands in for a skipped step (see :meth:`training_step`)."""
        self._note_skip(reason)
        self._skipping = True
        # a zero gradient for every trainable weight, whatever the weights' values
        weights = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([w.sum() for w in weights]).sum() * 0

    def _note_skip(self, reason: str | None) -> None:
        """Undo this step's BatchNorm updates, count the step, and warn (on rank 0) naming its
        images.

        ``reason``: what is wrong with this rank's batch, None if it is fine here but not on
        another rank. Every rank must call this.
        """
        with torch.no_grad():
            for buffer, saved in self._running_stats:
                buffer.copy_(saved)
        self.nonfinite_streak += 1
        gathered = gather_to_main((reason, self._step_images) if reason else None)
        if gathered is None:  # not rank 0
            return
        affected = [(rank, *entry) for rank, entry in enumerate(gathered) if entry is not None]
        self.nonfinite_images = [image_id for _, _, ids in affected for image_id in ids]
        ranked = len(gathered) > 1
        batches = "; ".join(
            f"{reason} for the batch of images {ids}" + (f" on rank {rank}" if ranked else "")
            for rank, reason, ids in affected
        )
        log.warning(
            "global step %d: %s; skipping the step on every rank (%d in a row)",
            self.trainer.global_step,
            batches,
            self.nonfinite_streak,
        )


def _reason(loss: Tensor | None, grad_norm: Tensor) -> str | None:
    """What is NaN/Inf on this rank in a skipped step (None: nothing, another rank's loss)."""
    if loss is not None and not bool(torch.isfinite(loss)):
        return f"the loss is {float(loss)}"
    if not bool(torch.isfinite(grad_norm)):
        return "a gradient is NaN/Inf"
    return None


class NonFiniteStop(pl.Callback):
    """Stops the run after ``max_consecutive`` training steps in a row were skipped because the
    loss or the gradients were NaN/Inf, with a checkpoint of the last good state.

    :class:`NonFiniteSkip` (DETRModule) skips such steps on every rank (the weights,
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
