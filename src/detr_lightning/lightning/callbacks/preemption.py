"""Stopping a training run before its end, on every rank at the same step, with its state
saved: on SIGTERM, on SLURM's requeue signal, and on submitit's (``hydra/launcher=slurm``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ...checkpoints.run_files import (
    next_hpc_checkpoint,
    prune_hpc_checkpoints,
    save_as_hpc_checkpoint,
)
from .. import compat

__all__ = ["SignalStop", "launcher_requeue_handler", "requeue_slurm_job"]

log = logging.getLogger(__name__)


# how long the other ranks wait for rank 0 to requeue the job (which ends them) before exiting
REQUEUE_WAIT_S = 60.0


# submitit's signal came and the stop has not handed the job over this long before the job's
# time limit (SLURM_JOB_END_TIME): requeue it without the save
REQUEUE_DEADLINE_MARGIN_S = 60.0


# stop reasons, ordered: the ranks agree on the largest one any of them has seen
_RUN_ON, _STOP, _REQUEUE, _LAUNCHER = 0, 1, 2, 3


def launcher_requeue_handler() -> tuple[signal.Signals, Callable[[int, Any], Any]] | None:
    """The signal and handler with which submitit (``hydra/launcher=slurm|local``) requeues
    the job this process runs in, before its time limit or on preemption; None outside a
    submitit job.

    Submitit installs the handler before it calls the job's function: on its signal (USR2, or
    ``SUBMITIT_PREEMPT_SIGNAL``) it lets the launcher write the job's next submission,
    requeues the job and exits the process, from wherever the signal interrupted it.
    """
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    signum = getattr(signal.Signals, f"SIG{name}", None)
    if signum is None:
        return None
    handler = signal.getsignal(signum)
    owner = getattr(handler, "__self__", None)
    if owner is None or not type(owner).__module__.startswith("submitit."):
        return None
    if getattr(handler, "__name__", "") != "checkpoint_and_try_requeue":
        return None
    return signum, handler


class SignalStop(pl.Callback):
    """Stops a training run on SIGTERM, or under SLURM on the requeue signal, at an optimizer
    step that every rank agrees on, and saves the state there.

    - **SIGTERM** (``kill``, ``scancel``, a preempted node): saves ``path`` (the run's
      last.ckpt); ``train`` then exits with status 143.
    - **The requeue signal** (``requeue_signal``, e.g. USR1 for ``sbatch --signal=USR1@90``):
      saves ``<run_dir>/hpc_ckpt_<n>.ckpt``, which a requeued job resumes without being told;
      :meth:`requeue` then has rank 0 run ``scontrol requeue`` for the job.
    - **Submitit's signal** (USR2; a job of ``hydra/launcher=slurm|local``, see
      :func:`launcher_requeue_handler`): the same save; :meth:`requeue` then hands the job to
      submitit's handler on rank 0, which requeues it (counting time-outs against
      ``max_num_timeout``) and exits. Left to itself, that handler ends rank 0 in the middle of
      a step, and the requeued job repeats every step since the last checkpoint. If the stop
      has not come ``REQUEUE_DEADLINE_MARGIN_S`` before the job's time limit, rank 0 calls
      the handler then, without the save (:meth:`_start_deadline`).

    The signal handler only notes the signal. After every optimizer step the ranks take the
    largest of their notes (one all-reduce of an int) and, if any rank was signalled, all of
    them stop after that step. Lightning's own SIGTERM handling, which this replaces while the
    run trains, takes rank 0's flag only and calls collectives from the signal handler (its
    SLURM handler even saves a checkpoint there, in the middle of whatever the step was doing):
    a signal that reaches some ranks and not others (one node of a job preempted, one process
    killed), or reaches them at different points of a step, leaves the ranks in different
    collectives, and the run hangs until the process group times out, having saved nothing.

    Where the stop waits:

    - between the batches that one optimizer step accumulates: until the step's last one (the
      gradients of the first ones would otherwise be lost);
    - during validation: until it ends, then for the next step; and a validation due after
      the step the ranks stop at runs in full first. A resumed run does not repeat an
      interrupted validation, so stopping in it would lose the epoch's metrics and its
      checkpoints; the job's grace period after SIGTERM should outlast a validation.
    - in the fit's last step or last validation: not at all, the fit finishes (``train``
      saves it with :meth:`save_if_signalled` when a test would follow).

    A ``SIGTERMException`` that Lightning raised itself (where this could not take the signal
    over: a trainer outside the main thread) saves last.ckpt as well. Other exceptions save
    nothing: their state may be half-way through a step.
    """

    def __init__(
        self, path: str | os.PathLike, requeue_signal: signal.Signals | None = None
    ) -> None:
        self.path = Path(path)
        self.requeue_signal = requeue_signal
        self._noted = _RUN_ON  # the largest reason this process has been signalled for
        self._reason = _RUN_ON  # the reason the ranks agreed on
        self._installed = False
        self._launcher: tuple[signal.Signals, Callable[[int, Any], Any]] | None = None
        self._global_zero = False
        self._handed_over = threading.Lock()  # held once the job went to submitit's handler
        self._deadline: threading.Timer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning puts back the handlers it found when the fit ends (those of this callback
        # go with them), so each fit starts afresh
        self._noted, self._reason, self._installed = _RUN_ON, _RUN_ON, False
        self._launcher, self._global_zero = None, trainer.is_global_zero
        self._handed_over = threading.Lock()
        self._deadline = None

    def _note(self, signum: int, frame: Any) -> None:
        if self._launcher is not None and signum == self._launcher[0]:
            reason = _LAUNCHER
        elif signum == self.requeue_signal:
            reason = _REQUEUE
        else:
            reason = _STOP
        self._noted = max(self._noted, reason)
        if reason == _LAUNCHER and self._global_zero and self._deadline is None:
            self._deadline = self._start_deadline()

    def _start_deadline(self) -> threading.Timer | None:
        """On rank 0, after submitit's signal: a timer that hands the job to submitit without
        the save if the stop has not done so ``REQUEUE_DEADLINE_MARGIN_S`` before the job's
        time limit (a validation longer than the signal's lead). A job that SLURM ends before
        it was requeued is not requeued at all; requeued, it resumes its last checkpoint.
        None where the limit is unknown (no ``SLURM_JOB_END_TIME``)."""
        end = os.environ.get("SLURM_JOB_END_TIME", "")
        if not end.isdigit():
            return None
        delay = max(int(end) - time.time() - REQUEUE_DEADLINE_MARGIN_S, 0.0)
        timer = threading.Timer(delay, self._hand_over, kwargs={"saved": False})
        timer.daemon = True
        timer.start()
        return timer

    def _hand_over(self, saved: bool = True) -> None:
        """Call submitit's handler, once (the stop or the deadline, whichever comes first)."""
        if self._launcher is None or not self._handed_over.acquire(blocking=False):
            return
        signum, handler = self._launcher
        if saved:
            log.warning("%s: handing the job to submitit to requeue it", signum.name)
        else:
            log.error(
                "%s: the run has not stopped %.0f s before the job's time limit; handing the "
                "job to submitit to requeue it now, without saving: it resumes from its last "
                "checkpoint (hydra.launcher.signal_delay_s sets how early the signal comes)",
                signum.name, REQUEUE_DEADLINE_MARGIN_S,
            )  # fmt: skip
        handler(signum, None)  # writes the next submission, requeues, raises SystemExit

    def _install(self, trainer: pl.Trainer) -> None:
        """Take over SIGTERM (and the requeue signal) from Lightning, whose handlers are
        installed just before the sanity check and training start."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        flag = compat.sigterm_flag(trainer)
        if flag.get():  # came before this hook
            flag.set(False)
            self._noted = max(self._noted, _STOP)
        signals = [signal.SIGTERM] + ([self.requeue_signal] if self.requeue_signal else [])
        self._launcher = launcher_requeue_handler()
        if self._launcher is not None:
            signals.append(self._launcher[0])
        for signum in signals:
            signal.signal(signum, self._note)
        self._installed = True

    def save_if_signalled(self, trainer: pl.Trainer) -> bool:
        """After a fit that ended normally: if a rank was signalled too late to stop it
        (during its last validation), save the state as a stop does and return True. Every
        rank must call it."""
        reason = largest_over_ranks(trainer, self._noted)
        if reason == _RUN_ON:
            return False
        self._reason = reason
        self._save(trainer)
        return True

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not compat.batch_closes_step(trainer):
            return
        reason = largest_over_ranks(trainer, self._noted)  # every rank, every step
        if reason == _RUN_ON or self._reason != _RUN_ON or _fit_ends_after_this_step(trainer):
            return  # (a fit that ends here is complete: nothing to stop)
        self._reason = reason
        flag = compat.sigterm_flag(trainer)
        if not flag.available:  # a Lightning without the flag: stop here
            raise SIGTERMException
        # On every rank alike, Lightning raises SIGTERMException after this batch's hooks,
        # its logging and a validation due after it (see on_validation_start), or at an
        # epoch's last batch after the epoch's end
        flag.set(True)

    # Lightning's evaluation loop stops at its next batch when the flag is set: a validation
    # due after the step the ranks stop at runs in full with the flag lowered.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reason != _RUN_ON and not trainer.sanity_checking:
            compat.sigterm_flag(trainer).set(False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reason != _RUN_ON and not trainer.sanity_checking:
            compat.sigterm_flag(trainer).set(True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        step, run_dir = trainer.global_step, Path(trainer.default_root_dir)
        if self._reason in (_REQUEUE, _LAUNCHER):
            path = next_hpc_checkpoint(run_dir)
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                name = self._requeued_by().name
                log.warning("%s: stopped at global step %d and saved %s", name, step, path)
                prune_hpc_checkpoints(path)
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: stopped at global step %d and saved %s; to continue, run the same "
                "command with resume=auto (and run_dir=%s if it does not name the run dir)",
                step, self.path, run_dir,
            )  # fmt: skip

    def _requeued_by(self) -> signal.Signals:
        if self._reason == _LAUNCHER and self._launcher is not None:
            return self._launcher[0]
        return self.requeue_signal or signal.SIGTERM

    def requeue(self, trainer: pl.Trainer) -> None:
        """After a stop that saved the state: on rank 0, requeue the job if the signal asked
        for it (``scontrol requeue``, or submitit's handler, which exits the process). Called
        by ``train`` once ``trainer.fit`` has returned, so that the loggers are closed before
        the requeue ends the job. Every rank calls it: the others then wait up to
        ``REQUEUE_WAIT_S`` for the requeue to end them.

        A submitit signal that reached rank 0 after the ranks agreed on a SIGTERM stop (the two
        come together on a preemption) is handed to submitit too: it would have requeued the
        job had it come a moment later, after the fit had put its handler back.
        """
        if not trainer.is_global_zero:
            if self._reason in (_REQUEUE, _LAUNCHER):
                # the requeue ends this task; exiting first could end rank 0 before it
                # requeues (srun --kill-on-bad-exit, KillOnBadExit=1)
                time.sleep(REQUEUE_WAIT_S)
            return
        launcher = self._launcher is not None and _LAUNCHER in (self._reason, self._noted)
        if launcher:
            if self._deadline is not None:
                self._deadline.cancel()
            if self._reason == _STOP:  # saved as last.ckpt: the requeued job looks for hpc_*
                path = save_as_hpc_checkpoint(self.path, trainer.default_root_dir)
                prune_hpc_checkpoints(path)
                name = self._launcher[0].name
                log.warning("%s came after the stop: %s is also %s", name, self.path, path)
            self._hand_over()
        elif self._reason in (_REQUEUE, _LAUNCHER):
            requeue_slurm_job()


def largest_over_ranks(trainer: pl.Trainer, value: int) -> int:
    """The largest of the ranks' ``value`` (one all-reduce through the strategy; none, and no
    device work, in a run of one process). Every rank must call it."""
    if trainer.world_size == 1:
        return value
    tensor = torch.tensor(value, device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(tensor, reduce_op="max"))


def _fit_ends_after_this_step(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step just taken is the fit's last (max_steps, or the last batch
    of the last epoch)."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = (
        trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    )
    return last_epoch and compat.is_last_batch(trainer)


def requeue_slurm_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Run ``scontrol requeue`` for this SLURM job (the array task, in a job array); False,
    with the reason logged, when it fails."""
    job = environ.get("SLURM_JOB_ID", "")
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    if not job.replace("_", "").isdigit():
        log.error("cannot requeue: SLURM_JOB_ID=%r is not a job id; resubmit the job with "
                  "resume=auto to continue", job)  # fmt: skip
        return False
    command = ["scontrol", "requeue", job]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("%s failed (%s); resubmit the job with resume=auto to continue",
                  " ".join(command), error)  # fmt: skip
        return False
    if result.returncode != 0:
        log.error("%s exited with %d: %s; resubmit the job with resume=auto to continue",
                  " ".join(command), result.returncode, result.stderr.strip())  # fmt: skip
        return False
    log.info("requeued SLURM job %s", job)
    return True
