"""Resuming a run: the checkpoint it takes (resume=auto, ckpt_path, a requeued job), the
checks of its settings, and a run that continues as if never stopped (logs, epoch means)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from detr_lightning.checkpoints.run_files import run_checkpoints
from detr_lightning.cli.resume import resume_checkpoint
from detr_lightning.cli.train import train
from detr_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from detr_lightning.lightning.loggers import CSVLogger, ResumableLogs
from detr_lightning.utils.errors import SetupError
from helpers import ROOT
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
            steps = loss_rows(tmp_path) if metrics.exists() else {}
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
    assert sorted(loss_rows(tmp_path)) == list(range(12))  # each step once
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
    write(tmp_path / "checkpoints" / "last.ckpt", training_state(3), 1000)
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


def test_a_requeued_job_resumes_its_hpc_checkpoint(tmp_path, monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    # a requeued job (the run dir holds an hpc_ckpt_<n>.ckpt) resumes without being told
    hpc = write(tmp_path / "hpc_ckpt_1.ckpt", training_state(5), 1000)
    assert resume_checkpoint(compose_config("train", tiny_overrides(tmp_path))) == str(hpc)


def test_a_requeued_job_started_from_a_file_resumes_its_own_later_state(tmp_path, monkeypatch):
    """A job that SLURM requeued runs its command again: with ckpt_path=<file> (or last), the
    run dir's checkpoint saved after that file wins, else every requeue would go back to the
    file. A job that was not requeued (a new sbatch into the same run dir, rolling back on
    purpose) resumes the file it names."""
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    start = write(tmp_path / "elsewhere" / "start.ckpt", training_state(4), 1000)
    run_dir = tmp_path / "run"
    cfg = compose_config("train", tiny_overrides(run_dir, f"ckpt_path={start}"))
    assert resume_checkpoint(cfg) == str(start)  # the first start
    hpc = write(run_dir / "hpc_ckpt_1.ckpt", training_state(6), 2000)
    assert resume_checkpoint(cfg) == str(start)  # not requeued: as given
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_checkpoint(cfg) == str(hpc)  # requeued after step 6
    os.utime(start, (3000, 3000))  # a file newer than the run's own state: as given
    assert resume_checkpoint(cfg) == str(start)
    # the step checkpoint and the stop's hpc checkpoint within one second: the stop's is later
    last = write(run_dir / "checkpoints" / "last.ckpt", training_state(5), 2000)
    cfg = compose_config("train", tiny_overrides(run_dir, "ckpt_path=last"))
    assert resume_checkpoint(cfg) == str(hpc)
    assert run_checkpoints(run_dir) == [hpc, last]
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"broken")  # none newer loads: as given
    os.utime(hpc, (2500, 2500))
    assert resume_checkpoint(cfg) == str(last)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_continues_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(
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

    wait_for(checkpoint_in_epoch_1, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed = torch.load(last, weights_only=True)  # the newest complete one
    step, epoch = killed["global_step"], killed["epoch"]
    assert 4 < step < 12 and step % 2 == 0 and epoch == (step - 1) // 4, (step, epoch)
    before = loss_rows(run_dir)
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
    after = loss_rows(run_dir)
    # every step logged once: the killed run's rows up to its checkpoint, then the resumed run's
    assert sorted(after) == list(range(12))
    assert {s: after[s] for s in range(step)} == {s: before[s] for s in range(step)}
    entries = json.loads(history.read_text())["history"]
    assert [entry["epoch"] for entry in entries] == [0, 1, 2]
    assert entries[: len(first_epochs)] == first_epochs


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
    losses = {run: {epoch: loss for epoch, loss, *_ in history(run)} for run in (run_dir, straight)}
    assert losses[run_dir][1] == losses[straight][1]
    assert epoch_rows(run_dir)[1] == epoch_rows(straight)[1]


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
    assert history(run_dir) == history(straight)
    assert [epoch for epoch, *_ in history(run_dir)] == [0, 1]


@pytest.mark.slow
def test_resume_auto_needs_a_run_dir_that_stays(tmp_path):
    command = [c for c in train_command("resume=auto") if not c.startswith("hydra.run")]
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
    conf = str(ROOT / "src" / "detr_lightning" / "conf")
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


class _BatchShapes(pl.Callback):
    """Records each step's padded batch shape; raises at (epoch, batch) ``crash_at``."""

    def __init__(self, crash_at: tuple[int, int] | None = None) -> None:
        self.crash_at, self.shapes = crash_at, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.crash_at:
            raise RuntimeError("crash")
        self.shapes[trainer.global_step] = tuple(batch[0].shape)


def test_padded_buckets_repeat_exactly_after_a_mid_epoch_resume(tmp_path):
    """With data.pad_to every batch lands on a fixed canvas, and a run resumed from within an
    epoch trains the same padded batches, with the same losses, as the uninterrupted run."""
    overrides = ["data.pad_to=[[64,64],[64,96],[96,64],[96,96],[128,128]]",
                 "data.synthetic.num_train=24", "callbacks=default", "callbacks.progress_bar=null",
                 "callbacks.metrics_history.plot=false",
                 "callbacks.checkpoint.every_n_train_steps=2"]  # fmt: skip
    straight = _BatchShapes()
    train(compose_config("train", tiny_overrides(tmp_path / "straight", *overrides)), [straight])
    canvases = {(64, 64), (64, 96), (96, 64), (96, 96), (128, 128)}
    assert len(straight.shapes) == 12  # 6 steps per epoch, 2 epochs
    assert {shape[-2:] for shape in straight.shapes.values()} <= canvases
    run_dir = tmp_path / "crashed"
    crashed = _BatchShapes(crash_at=(1, 3))  # global step 9; the last checkpoint is step 8's
    with pytest.raises(RuntimeError, match="crash"):
        train(compose_config("train", tiny_overrides(run_dir, *overrides)), [crashed])
    resumed = _BatchShapes()
    train(compose_config("train", tiny_overrides(run_dir, *overrides, "resume=auto")), [resumed])
    assert sorted(resumed.shapes) == [8, 9, 10, 11]
    assert {**crashed.shapes, **resumed.shapes} == straight.shapes
    assert loss_rows(run_dir) == loss_rows(tmp_path / "straight")
