"""Long runs: crash-safe checkpoints, resume=auto after a SIGKILL, SIGTERM, SLURM requeueing."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint

import detr_lightning.utils.io
from detr_lightning.checkpoints.reading import CheckpointError
from detr_lightning.checkpoints.run_files import (
    LoadedCheckpoint,
    file_identity,
    load_resume_checkpoint,
    next_hpc_checkpoint,
    run_checkpoints,
)
from detr_lightning.cli.resume import resume_checkpoint
from detr_lightning.cli.train import build_trainer, run_callbacks, train
from detr_lightning.lightning.callbacks.preemption import SignalStop, requeue_slurm_job
from detr_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from detr_lightning.lightning.loggers import CSVLogger, ResumableLogs
from detr_lightning.utils.errors import SetupError
from pipeline_fixtures import compose_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _training_state(step: int) -> dict:
    """A stand-in for a Lightning training checkpoint (the keys resume=auto requires)."""
    return {"state_dict": {"w": torch.full((2,), float(step))}, "optimizer_states": [],
            "loops": {}, "global_step": step, "epoch": 0}  # fmt: skip


def _write(path: Path, obj: object, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    os.utime(path, (mtime, mtime))
    return path


class _Opaque:
    """Pickled as a class reference: a weights_only load refuses it."""


def test_resume_auto_takes_the_newest_checkpoint_that_loads(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    older = _write(checkpoints / "best-epoch000.ckpt", _training_state(4), 1000)
    _write(checkpoints / "last.ckpt", _training_state(6), 2000)
    # newer, but cut short by a crash (not by our writer, which never leaves one)
    truncated = _write(tmp_path / "hpc_ckpt_1.ckpt", _training_state(8), 3000)
    truncated.write_bytes(truncated.read_bytes()[:200])
    code = _write(checkpoints / "odd.ckpt", {**_training_state(9), "x": _Opaque()}, 4000)
    weights_only = _write(checkpoints / "weights.ckpt", {"state_dict": {}}, 5000)
    stale = checkpoints / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")

    with caplog.at_level("WARNING"):
        found = load_resume_checkpoint(tmp_path)
    progress = {"epoch": found.state["epoch"], "global_step": found.state["global_step"]}
    assert found.path == checkpoints / "last.ckpt" and progress == {"epoch": 0, "global_step": 6}
    for skipped in (truncated, code, weights_only):
        assert str(skipped) in caplog.text
    assert not stale.exists()

    # an hpc checkpoint (SLURM requeue) that is newest and loads wins
    _write(tmp_path / "hpc_ckpt_2.ckpt", _training_state(10), 6000)
    assert load_resume_checkpoint(tmp_path).path == tmp_path / "hpc_ckpt_2.ckpt"

    # nothing at all: a new run; checkpoints that all fail: an error naming them
    assert load_resume_checkpoint(tmp_path / "new") is None
    for path in (older, checkpoints / "last.ckpt", tmp_path / "hpc_ckpt_2.ckpt"):
        path.unlink()
    with pytest.raises(SetupError, match=r"none of the 3 checkpoints(.|\n)*hpc_ckpt_1\.ckpt"):
        load_resume_checkpoint(tmp_path)


def test_checkpoint_io_is_atomic_and_loads_no_code(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_training_state(1), path)
    assert io.load_checkpoint(path)["global_step"] == 1

    def killed_mid_save(obj, target):
        Path(target).write_bytes(b"PK\x03\x04 the first bytes of a zip")
        raise KeyboardInterrupt  # stands in for the process dying during the write

    monkeypatch.setattr(torch, "save", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_training_state(2), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous file, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    # the data reach the disk before the rename makes them visible
    synced = []
    monkeypatch.setattr(detr_lightning.utils.io.os, "fsync", lambda fd: synced.append(fd))
    io.save_checkpoint(_training_state(3), path)
    assert len(synced) >= 1
    monkeypatch.undo()

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({**_training_state(1), "x": _Opaque()}, unsafe)
    with pytest.raises(CheckpointError, match=r"refused to load"):
        io.load_checkpoint(unsafe, weights_only=False)  # the caller cannot turn it off


def test_a_checkpoint_handed_over_is_not_read_again(tmp_path, monkeypatch):
    """train() hands the checkpoint it resumes, already read, to Lightning's load: used once,
    for that file only, not if the file changed after it was read, not across a pickle
    (ddp_spawn ranks), and dropped by forget()."""
    path = tmp_path / "last.ckpt"
    torch.save(_training_state(1), path)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    io = AtomicCheckpointIO()

    handed = LoadedCheckpoint(path, file_identity(path), _training_state(1))
    io.hand_over(handed)
    assert pickle.loads(pickle.dumps(io))._handed is None
    assert io.load_checkpoint(str(tmp_path / "." / "last.ckpt")) is handed.state  # same file
    assert reads == []
    assert io.load_checkpoint(path)["global_step"] == 1  # once only
    assert reads == [path]

    io.hand_over(handed)
    other = tmp_path / "other.ckpt"
    torch.save(_training_state(2), other)
    assert io.load_checkpoint(other)["global_step"] == 2  # another file is read
    assert io.load_checkpoint(path) is not handed.state  # and the hand-over is gone

    io.hand_over(handed)
    io.forget()
    assert io.load_checkpoint(path) is not handed.state

    torch.save(_training_state(3), path)  # rewritten after it was read, before the hand-over
    os.utime(path, ns=(1, 1))
    io.hand_over(handed)
    assert io.load_checkpoint(path)["global_step"] == 3
    read = LoadedCheckpoint.read(path)  # the identity is taken before the contents
    assert read.identity == file_identity(path) and read.state["global_step"] == 3


class _StepLogger(pl.LightningModule):
    """One weight, one logged value per step; a later hook logs one more value."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).sum() ** 2
        self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:  # after the step checkpoint of global step 2
            self.log("late", 1.0, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(6, 2)))


def test_a_step_checkpoint_lands_after_the_rows_of_every_step_before_it(tmp_path):
    """A kill right after a checkpoint of global step s leaves metrics.csv with every step
    before s (a resumed run logs s onwards), though Lightning logs step s-1 after the hook."""
    metrics = tmp_path / "csv" / "metrics.csv"
    on_disk: list[tuple[int, set[int]]] = []

    class Recording(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            super().save_checkpoint(checkpoint, path, storage_options)
            steps = _loss_rows(tmp_path) if metrics.exists() else {}
            on_disk.append((checkpoint["global_step"], set(steps)))

    # two step checkpoints: every 2 steps and every 4, so that two land at one step
    checkpoints = [ModelCheckpoint(tmp_path / f"every{n}", every_n_train_steps=n, save_top_k=-1,
                                   monitor=None) for n in (2, 4)]  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=2, logger=CSVLogger(tmp_path, name="csv", version=""), log_every_n_steps=1,
        callbacks=[ResumableLogs(), *checkpoints], plugins=[Recording()],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_StepLogger())
    # 6 also ends epoch 0; each checkpoint lands with the rows of all the steps before it
    assert [s for s, _ in on_disk] == [2, 4, 4, 6, 8, 8, 10, 12, 12]
    for step, logged in on_disk:
        assert set(range(step)) <= logged, (step, logged)
    assert sorted(_loss_rows(tmp_path)) == list(range(12))  # each step once
    # what the later hook logged for step 1 is kept too, and no value is written twice
    logged: dict[int, list[str]] = {}
    for row in csv.DictReader(metrics.open(newline="")):
        keys = [k for k, v in row.items() if v and k not in ("step", "epoch")]
        logged.setdefault(int(row["step"]), []).extend(keys)
    assert sorted(logged[1]) == ["late", "train/loss_step"]
    assert all(len(keys) == len(set(keys)) for keys in logged.values()), logged


def test_resume_settings_are_checked(tmp_path, caplog, monkeypatch):
    def resolve(*overrides: str):
        return resume_checkpoint(compose_config("train", tiny_overrides(tmp_path, *overrides)))

    assert resolve() is None
    with caplog.at_level("INFO"):
        assert resolve("resume=auto") is None  # nothing to resume yet: a new run
    assert f"no checkpoint in {tmp_path} yet, starting a new run" in caplog.text
    with pytest.raises(SetupError, match=r"ckpt_path=last: .*checkpoints/last\.ckpt does not "):
        resolve("ckpt_path=last")
    with pytest.raises(SetupError, match=r"pass one of them"):
        resolve("ckpt_path=last", "resume=auto")
    with pytest.raises(SetupError, match=r"resume='yes'"):
        resolve("resume=yes")
    with pytest.raises(SetupError, match=r"ckpt_path=nope\.ckpt: no such file(.|\n)*resume=auto"):
        resolve("ckpt_path=nope.ckpt")
    _write(tmp_path / "checkpoints" / "last.ckpt", _training_state(3), 1000)
    assert resolve("ckpt_path=last") == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve("resume=auto") == str(tmp_path / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))  # Lightning's load gets the expanded path
    assert resolve("ckpt_path='~/checkpoints/last.ckpt'") == str(
        tmp_path / "checkpoints" / "last.ckpt"
    )


def test_resuming_weights_that_need_their_config_names_it(tmp_path):
    """ckpt_path at a safetensors file or Hugging Face's pytorch_model.bin is read with the
    config.json beside it (not as one torch file, which it would load as): its absence is
    named."""
    from safetensors.torch import save_file

    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({"w": torch.zeros(2)}, weights / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, weights / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        cfg = compose_config(
            "train", tiny_overrides(tmp_path / "run", f"ckpt_path={weights / name}")
        )
        with pytest.raises(FileNotFoundError, match=r"need the config\.json"):
            train(cfg)


# what srun sets for a one-task job
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "detr", "SLURM_JOB_ID": "42",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip


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


def test_a_requeued_job_resumes_its_hpc_checkpoint(tmp_path, monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    # a requeued job (the run dir holds an hpc_ckpt_<n>.ckpt) resumes without being told
    hpc = _write(tmp_path / "hpc_ckpt_1.ckpt", _training_state(5), 1000)
    assert resume_checkpoint(compose_config("train", tiny_overrides(tmp_path))) == str(hpc)


def test_a_requeued_job_started_from_a_file_resumes_its_own_later_state(tmp_path, monkeypatch):
    """A job that SLURM requeued runs its command again: with ckpt_path=<file> (or last), the
    run dir's checkpoint saved after that file wins, else every requeue would go back to the
    file. A job that was not requeued (a new sbatch into the same run dir, rolling back on
    purpose) resumes the file it names."""
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    start = _write(tmp_path / "elsewhere" / "start.ckpt", _training_state(4), 1000)
    run_dir = tmp_path / "run"
    cfg = compose_config("train", tiny_overrides(run_dir, f"ckpt_path={start}"))
    assert resume_checkpoint(cfg) == str(start)  # the first start
    hpc = _write(run_dir / "hpc_ckpt_1.ckpt", _training_state(6), 2000)
    assert resume_checkpoint(cfg) == str(start)  # not requeued: as given
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_checkpoint(cfg) == str(hpc)  # requeued after step 6
    os.utime(start, (3000, 3000))  # a file newer than the run's own state: as given
    assert resume_checkpoint(cfg) == str(start)
    # the step checkpoint and the stop's hpc checkpoint within one second: the stop's is later
    last = _write(run_dir / "checkpoints" / "last.ckpt", _training_state(5), 2000)
    cfg = compose_config("train", tiny_overrides(run_dir, "ckpt_path=last"))
    assert resume_checkpoint(cfg) == str(hpc)
    assert run_checkpoints(run_dir) == [hpc, last]
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"broken")  # none newer loads: as given
    os.utime(hpc, (2500, 2500))
    assert resume_checkpoint(cfg) == str(last)


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
        last = _write(tmp_path / "checkpoints" / "last.ckpt", _training_state(7), 2000)
        old = _write(tmp_path / "hpc_ckpt_3.ckpt", _training_state(2), 1000)
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


# ------------------------------------------------------------------------ real processes
def _command(*extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(Path("unused")) if not o.startswith("run_dir")]
    return [sys.executable, str(ROOT / "train.py"), *overrides, "cpu_threads=1", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"train.py ended early:\n{process.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for train.py")
        time.sleep(0.05)


def _loss_rows(run_dir: Path) -> dict[int, str]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss_step")]
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {int(row["step"]): row["train/loss_step"] for row in rows}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_continues_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    command = _command(
        f"hydra.run.dir={run_dir}",  # the documented way to fix the run dir
        "trainer.max_epochs=3",
        "data.synthetic.num_train=16",  # 4 steps per epoch, 12 in all
        "callbacks=default",
        "callbacks.progress_bar=null",
        "callbacks.metrics_history.plot=false",
        "callbacks.checkpoint.every_n_train_steps=2",
    )
    last, history = run_dir / "checkpoints" / "last.ckpt", run_dir / "metrics.json"
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    # kill as soon as a step checkpoint of epoch 1 exists (epoch 0 is in metrics.json)
    seen = {"mtime": 0, "step": 0}

    def checkpoint_in_epoch_1() -> bool:
        if last.exists() and last.stat().st_mtime_ns != seen["mtime"]:
            seen["mtime"] = last.stat().st_mtime_ns
            seen["step"] = torch.load(last, weights_only=True, mmap=True)["global_step"]
        return seen["step"] > 4

    _wait_for(checkpoint_in_epoch_1, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed = torch.load(last, weights_only=True)  # the newest complete one
    step, epoch = killed["global_step"], killed["epoch"]
    assert 4 < step < 12 and step % 2 == 0 and epoch == (step - 1) // 4, (step, epoch)
    before = _loss_rows(run_dir)
    assert set(range(step)) <= set(before)
    first_epochs = json.loads(history.read_text())["history"]
    assert [entry["epoch"] for entry in first_epochs] == list(range(len(first_epochs)))
    assert first_epochs

    result = subprocess.run([*command, "resume=auto"], cwd=tmp_path, env=ENV, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"resuming {last} (epoch {epoch}, global step {step})" in output
    assert "not resumable" not in output  # Lightning's warning for loaders that restart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the same run dir
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]
    assert torch.load(last, weights_only=True)["global_step"] == 12
    after = _loss_rows(run_dir)
    # every step logged once: the killed run's rows up to its checkpoint, then the resumed run's
    assert sorted(after) == list(range(12))
    assert {s: after[s] for s in range(step)} == {s: before[s] for s in range(step)}
    entries = json.loads(history.read_text())["history"]
    assert [entry["epoch"] for entry in entries] == [0, 1, 2]
    assert entries[: len(first_epochs)] == first_epochs


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


def _history(run_dir: Path) -> list[tuple]:
    """(epoch, training loss, images evaluated, mAP) of every entry of metrics.json."""
    entries = json.loads((run_dir / "metrics.json").read_text())["history"]
    return [(e["epoch"], e["train_loss"], e.get("num_images"), e.get("map")) for e in entries]


def _epoch_rows(run_dir: Path) -> dict[int, str]:
    """metrics.csv's epoch means of the training loss, by epoch."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return {int(row["epoch"]): row["train/loss"] for row in csv.DictReader(file)
                if row.get("train/loss")}  # fmt: skip


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
    assert _history(run_dir) == _history(straight)[:2]  # epoch 1 validated in full
    train(compose_config("train", tiny_overrides(run_dir, *overrides, "resume=auto")))
    assert _history(run_dir) == _history(straight)
    assert all(images == 16 for *_, images, _ in _history(run_dir))
    assert _loss_rows(run_dir) == _loss_rows(straight)
    assert _epoch_rows(run_dir) == _epoch_rows(straight) and sorted(_epoch_rows(run_dir)) == [
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
    assert len(_history(tmp_path)) == 2
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


class _Crash(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (1, 0):
            raise RuntimeError("crash")


def _crash_and_resume(tmp_path: Path, overrides: list[str]) -> tuple[Path, Path, int]:
    """An uninterrupted run; a run that crashes at epoch 1's first batch, then is resumed
    with resume=auto. Returns both run dirs and the global step of the checkpoint resumed."""
    straight = tmp_path / "straight"
    train(compose_config("train", tiny_overrides(straight, *overrides)))
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="crash"):
        train(compose_config("train", tiny_overrides(run_dir, *overrides)), [_Crash()])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    train(compose_config("train", tiny_overrides(run_dir, *overrides, "resume=auto")))
    return straight, run_dir, state["global_step"]


def test_epoch_means_after_a_checkpoint_at_an_epochs_last_step(tmp_path):
    """Lightning takes a checkpoint written at an epoch's last batch for a mid-epoch one and
    skips the next epoch's on_train_epoch_start: the loss sums restored from it (the finished
    epoch's) must not flow into the next epoch's means."""
    overrides = ["callbacks=default", "callbacks.progress_bar=null",
                 "callbacks.metrics_history.plot=false", "callbacks.last_checkpoint=null",
                 "callbacks.model_checkpoint=null",
                 "callbacks.checkpoint.every_n_train_steps=2",
                 # Lightning's own, which saves at an epoch's last batch (StepCheckpoint not)
                 f"callbacks.checkpoint._target_={ModelCheckpoint.__module__}.ModelCheckpoint",
                 ]  # fmt: skip
    straight, run_dir, crashed_at = _crash_and_resume(tmp_path, overrides)
    assert crashed_at == 2  # written at epoch 0's last step
    losses = {
        run: {epoch: loss for epoch, loss, *_ in _history(run)} for run in (run_dir, straight)
    }
    assert losses[run_dir][1] == losses[straight][1]
    assert _epoch_rows(run_dir)[1] == _epoch_rows(straight)[1]


def test_no_step_checkpoint_at_an_epochs_last_step(tmp_path):
    """Resumed from a checkpoint written at an epoch's last batch, Lightning skips that epoch's
    validation and end-of-epoch hooks; the step checkpoint leaves that batch to the epoch
    checkpoint, which comes after them. With only step checkpoints, a crash at the next epoch's
    start resumes from the step before, and metrics.json keeps every epoch."""
    overrides = ["callbacks=default", "callbacks.progress_bar=null", "data.synthetic.num_train=24",
                 "callbacks.metrics_history.plot=false", "callbacks.last_checkpoint=null",
                 "callbacks.model_checkpoint=null",
                 "callbacks.checkpoint.every_n_train_steps=3"]  # fmt: skip
    straight, run_dir, crashed_at = _crash_and_resume(tmp_path, overrides)
    assert crashed_at == 3  # 6 steps per epoch: step 6 ended epoch 0, not saved
    assert _history(run_dir) == _history(straight)
    assert [epoch for epoch, *_ in _history(run_dir)] == [0, 1]


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
    assert sorted(_loss_rows(run_dir)) == [0, 1, 2, 3]


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
    command = _command(f"run_dir={run_dir}", "trainer.max_epochs=50",
                       "trainer.limit_val_batches=0")  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    _wait_for((run_dir / "metrics.json").exists, process)  # epoch 0 is done
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] >= 2  # 2 steps per epoch, epoch 0 done
    assert f"SIGTERM: stopped at global step {state['global_step']}" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_resume_auto_needs_a_run_dir_that_stays(tmp_path):
    command = [c for c in _command("resume=auto") if not c.startswith("hydra.run")]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, text=True, capture_output=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 1
    assert "error: resume=auto resumes the run in its run dir" in result.stderr
    assert "hydra.run.dir=outputs/train/<name>" in result.stderr
    assert "(hydra.run.dir=outputs/${task_name}/" in result.stderr  # the default, readable


@pytest.mark.parametrize("slurm_job", [None, "4242"])
def test_resume_auto_takes_a_given_run_dir_or_a_slurm_job_id(tmp_path, monkeypatch, slurm_job):
    """Through Hydra: the default run dir is new at every start (refused with resume=auto,
    unless SLURM's job id names it); a given run_dir, which Hydra's directory follows, is not."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    import detr_lightning.cli.config  # noqa: F401  (as the entry scripts)
    from detr_lightning.cli.resume import _check_fixed_run_dir

    if slurm_job:
        monkeypatch.setenv("SLURM_JOB_ID", slurm_job)
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    conf = str(Path(__file__).resolve().parents[1] / "src" / "detr_lightning" / "conf")
    for overrides, refused in (([], not slurm_job), ([f"run_dir={tmp_path / 'run'}"], False)):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("train", ["resume=auto", *overrides], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(cfg.hydra.run.dir)  # what Hydra sets
        HydraConfig.instance().set_config(cfg)
        try:
            task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            assert task.run_dir == (overrides[0][len("run_dir=") :] if overrides else
                                    cfg.hydra.runtime.output_dir)  # fmt: skip
            if refused:
                with pytest.raises(SetupError, match=r"new at every start \(hydra\.run\.dir="
                                                     r"outputs/\$\{task_name\}/"):  # fmt: skip
                    _check_fixed_run_dir(task)
            else:
                _check_fixed_run_dir(task)
        finally:
            HydraConfig.instance().cfg = None
