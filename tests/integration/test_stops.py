"""Stopping a run on a signal: SIGTERM, SLURM's and submitit's requeue signals, at one step on
every rank, near a validation, between accumulated batches, with the state saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment

from detr_lightning.checkpoints.run_files import next_hpc_checkpoint
from detr_lightning.cli.train import build_trainer, run_callbacks, train
from detr_lightning.lightning.callbacks.preemption import SignalStop, requeue_slurm_job
from detr_lightning.utils.errors import SetupError
from helpers.pipeline import compose_config, tiny_overrides
from helpers.runs import (
    ENV,
    SLURM_ENV,
    epoch_rows,
    history,
    loss_rows,
    train_command,
    training_state,
    wait_for,
    write,
)


def _signal_stop(cfg) -> SignalStop:
    (stop,) = [c for c in run_callbacks(cfg) if isinstance(c, SignalStop)]
    return stop


def test_slurm_requeue_settings_reach_the_signal_stop(tmp_path, monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    cfg = compose_config("train", tiny_overrides(tmp_path, "slurm.requeue_signal=USR2"))
    assert _signal_stop(cfg).requeue_signal == signal.SIGUSR2
    # Lightning sees the SLURM job but installs no requeue handler of its own
    environment = build_trainer(cfg)._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    cfg = compose_config("train", tiny_overrides(tmp_path, "slurm.auto_requeue=false"))
    assert _signal_stop(cfg).requeue_signal is None
    for name in ("USR9", "TERM"):
        cfg = compose_config("train", tiny_overrides(tmp_path, f"slurm.requeue_signal={name}"))
        with pytest.raises(SetupError, match=rf"slurm.requeue_signal={name}"):
            run_callbacks(cfg)
    for key in SLURM_ENV:  # not a SLURM job: no requeue signal
        monkeypatch.delenv(key)
    assert _signal_stop(compose_config("train", tiny_overrides(tmp_path))).requeue_signal is None


class _SubmititHandler:
    """Stands in for submitit's SignalHandler (same module prefix and method name)."""

    __module__ = "submitit.core.job_environment"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum, frame=None) -> None:
        self.calls.append(signum)


def test_submitit_signal_after_a_sigterm_stop_is_handed_over_with_an_hpc_checkpoint(
    tmp_path, monkeypatch
):
    """Submitit's signal reaching rank 0 after the ranks agreed on a SIGTERM stop (the two come
    together on a preemption): last.ckpt, just saved, becomes the next hpc checkpoint (a
    requeued job looks for those) and older ones go; then submitit requeues."""
    from detr_lightning.lightning.callbacks.preemption import (
        _LAUNCHER,
        _STOP,
        launcher_requeue_handler,
    )

    submitit = _SubmititHandler()
    previous = signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
    try:
        assert launcher_requeue_handler() == (signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
        monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # another signal: not submitit's
        assert launcher_requeue_handler() is None
        monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL")
        last = write(tmp_path / "checkpoints" / "last.ckpt", training_state(7), 2000)
        old = write(tmp_path / "hpc_ckpt_3.ckpt", training_state(2), 1000)
        stop = SignalStop(last)
        stop._launcher = launcher_requeue_handler()
        stop._reason, stop._noted = _STOP, _LAUNCHER
        trainer = type("T", (), {"is_global_zero": True, "default_root_dir": str(tmp_path)})()
        stop.requeue(trainer)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert submitit.calls == [signal.SIGUSR2]
    assert not old.exists()
    assert torch.load(tmp_path / "hpc_ckpt_4.ckpt", weights_only=True)["global_step"] == 7
    assert last.is_file()


def test_submitit_signal_requeues_without_the_save_near_the_time_limit(tmp_path, monkeypatch):
    """A stop that waits (a long validation) past REQUEUE_DEADLINE_MARGIN_S before the job's
    time limit would leave the job ended by SLURM and never requeued: rank 0 then hands it to
    submitit without the save, once; a stop in time hands it over itself, once."""
    from detr_lightning.lightning.callbacks.preemption import _LAUNCHER, REQUEUE_DEADLINE_MARGIN_S

    trainer = type("T", (), {"is_global_zero": True, "default_root_dir": str(tmp_path)})()
    for seconds_left, calls_before_the_stop in ((REQUEUE_DEADLINE_MARGIN_S, 1), (3600, 0)):
        monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time() + seconds_left)))
        submitit = _SubmititHandler()
        stop = SignalStop(tmp_path / "last.ckpt")
        stop._launcher = (signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
        stop._global_zero = True
        stop._note(signal.SIGUSR2, None)
        deadline = time.monotonic() + 5
        while calls_before_the_stop and not submitit.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(submitit.calls) == calls_before_the_stop
        stop._reason = _LAUNCHER  # the ranks stop and save: the stop's own hand-over
        stop.requeue(trainer)
        assert submitit.calls == [signal.SIGUSR2]


class _SignalDuring(pl.Callback):
    """Sends this process ``signum`` while training batch ``batch`` of ``epoch`` runs (or, with
    ``validation``, after that validation batch); counts the training batches."""

    def __init__(self, batch: int, epoch: int = 0, validation: bool = False,
                 signum: int = signal.SIGTERM) -> None:  # fmt: skip
        self.batch, self.epoch, self.validation, self.signum = batch, epoch, validation, signum
        self.trained = 0

    def _maybe_send(self, trainer, batch_idx: int, validation: bool) -> None:
        if trainer.sanity_checking or validation != self.validation:
            return
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_send(trainer, batch_idx, validation=False)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:  # fmt: skip
        self._maybe_send(trainer, batch_idx, validation=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained += 1


def test_sigterm_between_accumulated_batches_stops_after_the_step(tmp_path):
    """A SIGTERM during the first of two accumulated batches stops the run after the second,
    with the optimizer step done and saved, instead of dropping the first one's gradients."""
    overrides = ["trainer.accumulate_grad_batches=2", "data.synthetic.num_train=16",
                 "callbacks=default", "callbacks.progress_bar=null",
                 "callbacks.metrics_history.plot=false"]  # fmt: skip
    cfg = compose_config("train", tiny_overrides(tmp_path, *overrides))
    signal_during = _SignalDuring(batch=2)  # batches 2 and 3 make the second step
    with pytest.raises(SystemExit) as stopped:
        train(cfg, [signal_during])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal_during.trained == 4
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    batches = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert batches["processed"] == 4


@pytest.mark.parametrize(
    ("during", "stop_step"),
    [
        (_SignalDuring(batch=1, epoch=1, validation=True), 5),  # in validation: 4 batches
        (_SignalDuring(batch=1, epoch=1), 4),  # in epoch 1's last step, before its validation
    ],
    ids=["in-validation", "before-validation"],
)
def test_sigterm_near_validation_lets_it_finish_then_stops(tmp_path, during, stop_step):
    """A resumed run does not repeat an interrupted validation: a stop inside one would lose
    the epoch's metrics. The run validates to the end and stops after the next step (or after
    the epoch's end), and the resumed run has every epoch's metrics and losses as the
    uninterrupted run."""
    overrides = ["trainer.max_epochs=3", "data.synthetic.num_val=16", "callbacks=default",
                 "callbacks.progress_bar=null", "callbacks.metrics_history.plot=false"]  # fmt: skip
    straight = tmp_path / "straight"
    train(compose_config("train", tiny_overrides(straight, *overrides)))
    run_dir = tmp_path / "stopped"
    cfg = compose_config("train", tiny_overrides(run_dir, *overrides))
    with pytest.raises(SystemExit) as stopped:
        train(cfg, [during])
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == stop_step  # 2 steps per epoch
    assert during.trained == stop_step
    assert history(run_dir) == history(straight)[:2]  # epoch 1 validated in full
    train(compose_config("train", tiny_overrides(run_dir, *overrides, "resume=auto")))
    assert history(run_dir) == history(straight)
    assert all(images == 16 for *_, images, _ in history(run_dir))
    assert loss_rows(run_dir) == loss_rows(straight)
    assert epoch_rows(run_dir) == epoch_rows(straight) and sorted(epoch_rows(run_dir)) == [
        0,
        1,
        2,
    ]


def test_sigterm_during_the_last_validation_leaves_the_test_for_the_restart(tmp_path):
    """Signalled too late to stop the fit, a run with test_after_fit saves the finished fit and
    exits 143 instead of starting a test that would outlast the kill's grace period; the
    restart with resume=auto finds the fit done and runs the test."""
    overrides = ["trainer.max_epochs=2", "test_after_fit=true", "callbacks=default",
                 "callbacks.progress_bar=null", "callbacks.metrics_history.plot=false"]  # fmt: skip
    cfg = compose_config("train", tiny_overrides(tmp_path, *overrides))
    during = _SignalDuring(batch=0, epoch=1, validation=True)
    with pytest.raises(SystemExit) as stopped:
        train(cfg, [during])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert during.trained == 4  # the whole fit
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4 and state["epoch"] == 2  # saved as finished
    assert len(history(tmp_path)) == 2
    restarted = _SignalDuring(batch=-1)  # counts training batches, sends nothing
    metrics = train(compose_config("train", tiny_overrides(tmp_path, *overrides, "resume=auto")),
                    [restarted])  # fmt: skip
    assert restarted.trained == 0 and "map" in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 4


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path):
    """The fit ends after that step anyway: it finishes (exit 0) instead of reporting an
    interrupted run."""
    cfg = compose_config("train", tiny_overrides(tmp_path, "trainer.max_steps=3"))
    during = _SignalDuring(batch=0, epoch=1)  # step 3 of 3
    train(cfg, [during])
    assert during.trained == 3


def test_requeue_signal_saves_an_hpc_checkpoint_and_requeues_the_job(tmp_path, monkeypatch):
    """SLURM's requeue signal (sbatch --signal=USR1@90) stops the run after the step, saves
    hpc_ckpt_<n>.ckpt and runs scontrol requeue; the requeued job resumes it unasked."""
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    fake_bin, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_epochs=2", "trainer.limit_val_batches=0"]
    cfg = compose_config("train", tiny_overrides(run_dir, *overrides))
    during = _SignalDuring(batch=0, epoch=1, signum=signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        train(cfg, [during])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert calls.read_text() == "requeue 42\n"
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    assert torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # one save, the one resumed
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # given back after the run
    # the requeued job: the same command, no resume=auto
    train(compose_config("train", tiny_overrides(run_dir, *overrides)))
    assert sorted(loss_rows(run_dir)) == [0, 1, 2, 3]


def test_requeue_helpers(tmp_path, monkeypatch, caplog):
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", "hpc_ckpt_x.ckpt"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_11.ckpt"

    fake_bin, calls = tmp_path / "bin", tmp_path / "calls"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    array = {"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7"}
    assert requeue_slurm_job(array)  # a job array's task is requeued by its array id
    assert calls.read_text() == "requeue 100_7\n"
    assert not requeue_slurm_job({"SLURM_JOB_ID": "1; rm -rf /"})
    assert "is not a job id" in caplog.text
    scontrol.write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    assert not requeue_slurm_job({"SLURM_JOB_ID": "5"})
    assert "exited with 1: Invalid job id; resubmit the job with resume=auto" in caplog.text
    scontrol.unlink()
    assert not requeue_slurm_job({"SLURM_JOB_ID": "5"})
    assert "scontrol requeue 5 failed" in caplog.text
    assert calls.read_text() == "requeue 100_7\n"


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_exits(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(f"run_dir={run_dir}", "trainer.max_epochs=50",
                       "trainer.limit_val_batches=0")  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    wait_for((run_dir / "metrics.json").exists, process)  # epoch 0 is done
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] >= 2  # 2 steps per epoch, epoch 0 done
    assert f"SIGTERM: stopped at global step {state['global_step']}" in output
    assert "Traceback" not in output
