"""DDP on CPU (gloo), launched through train.py as a user would: one flag, one run dir; and no
rank skips a step when its whole batch is unreadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_lightning.cli.train import build_trainer
from detr_lightning.utils.errors import SetupError
from helpers import ROOT
from helpers.data import make_tiny_synthetic
from helpers.pipeline import compose_config, tiny_overrides


@pytest.mark.slow
def test_ddp_on_cpu_through_train_py_with_unreadable_images(tmp_path):
    # 8 training images of which 7 do not decode: nearly every per-device batch (2 images) is
    # wholly unreadable on some rank; each is replaced by the readable one, so both ranks run
    # every step (a rank that skipped one would leave the other waiting in its all-reduce).
    root = make_tiny_synthetic(tmp_path / "data", num_train=8, num_val=4, num_categories=3,
                               min_size=64, max_size=96)  # fmt: skip
    train_files = sorted((root / "train2017").iterdir())
    for path in train_files[1:]:
        path.write_bytes(b"\xff\xd8 not a jpeg")
    next(iter(sorted((root / "val2017").iterdir()))).write_bytes(b"garbage")
    overrides = [
        o for o in tiny_overrides(Path("unused")) if not o.startswith(("run_dir", "trainer.max"))
    ]
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"data.root={root}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_epochs=2",
        "callbacks=default",
        "callbacks.progress_bar=null",
        "cpu_threads=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # the default run dir (outputs/train/<time>) relative to the working directory
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(run_dirs) == 1, run_dirs  # the second rank reused the first rank's run dir
    run_dir = run_dirs[0]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    output = result.stdout + result.stderr + (run_dir / "train.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # two processes trained
    assert train_files[1].name in output  # the unreadable files are named
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    # every epoch: 8 samples over both ranks, 7 of them standing in for unreadable images
    assert [entry["train_stand_in_images"] for entry in metrics["history"]] == [7, 7]
    # validation: 4 images, the unreadable one evaluated as missed, counted once over ranks
    assert metrics["num_images"] == 4 and metrics["skipped_images"] == 1
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 * 2  # 2 epochs x (8 images / global batch 4)


# Run by test_ddp_resume_mid_epoch_repeats_every_rank as a script: Lightning's DDP launcher
# starts the other rank by running the same command again.
_RESUME_SCRIPT = """
import json, os, sys
from pathlib import Path

from detr_lightning.cli.train import train
from helpers.pipeline import compose_config, tiny_overrides
from helpers.pipeline import RecordBatches


if __name__ == "__main__":
    run_dir, middle, resume = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "resume"
    overrides = ["trainer.max_epochs=2", "data.synthetic.num_train=24", "data.batch_size=4",
                 "data.crop=true", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp", "cpu_threads=1"]
    if resume:
        overrides.append(f"ckpt_path={middle}")
    steps = RecordBatches(save_at=None if resume else 8, path=middle)  # epoch 1: 6 steps, after 2
    train(compose_config("train", tiny_overrides(run_dir, *overrides)), [steps])
    rank = os.environ.get("LOCAL_RANK", "0")
    (run_dir.parent / f"{run_dir.name}_rank{rank}.json").write_text(json.dumps(steps.steps))
"""


@pytest.mark.slow
def test_ddp_resume_mid_epoch_repeats_every_rank(tmp_path):
    """Two ranks, a checkpoint written in the middle of epoch 1: the resumed run trains the
    same images with the same losses as the uninterrupted one on both ranks (dropout too:
    each rank's is seeded per batch, where a checkpoint holds rank 0's RNG state only)."""
    script = tmp_path / "resume_run.py"
    script.write_text(_RESUME_SCRIPT)
    middle = tmp_path / "middle.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}  # fmt: skip
    for run in ("straight", "resume"):
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path / run), str(middle), run],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        straight = json.loads((tmp_path / f"straight_rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"resume_rank{rank}.json").read_text())
        assert len(straight) == 12 and len(resumed) == 4  # 6 steps per epoch, resumed after 8
        assert resumed == straight[8:], rank
    # epoch 1's mean loss over both ranks counts its 2 steps before the checkpoint once
    losses = {run: [entry["train_loss"] for entry in
                    json.loads((tmp_path / run / "metrics.json").read_text())["history"]]
              for run in ("straight", "resume")}  # fmt: skip
    assert len(losses["straight"]) == 2 and losses["resume"] == losses["straight"]


# Run by test_sigterm_to_one_rank_stops_every_rank as a script (see _RESUME_SCRIPT).
_SIGTERM_SCRIPT = """
import os, signal, sys
from pathlib import Path

import pytorch_lightning as pl

from detr_lightning.cli.train import train
from helpers.pipeline import compose_config, tiny_overrides


class SigtermRank1(pl.Callback):
    def __init__(self, send):
        self.send, self.trained = send, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.send and (trainer.global_rank, trainer.current_epoch, batch_idx) == (1, 1, 0):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained += 1
        rank = trainer.global_rank
        (run_dir.parent / f"trained_rank{rank}").write_text(str(self.trained))


if __name__ == "__main__":
    run_dir, resume = Path(sys.argv[1]), sys.argv[2] == "resume"
    overrides = ["trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp", "trainer.limit_val_batches=0", "cpu_threads=1"]
    if resume:
        overrides.append("resume=auto")
    train(compose_config("train", tiny_overrides(run_dir, *overrides)), [SigtermRank1(not resume)])
"""


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank(tmp_path):
    """A SIGTERM that reaches rank 1 alone (one node of a job preempted, one process killed)
    stops both ranks after the same step with last.ckpt saved, instead of leaving them in
    different collectives until the process group times out; resume=auto then finishes."""
    script = tmp_path / "sigterm_run.py"
    script.write_text(_SIGTERM_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}  # fmt: skip
    stopped = subprocess.run(
        [sys.executable, str(script), str(run_dir), "stop"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, output[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 images, a global batch of 4: 2 steps in epoch 0, then the one rank 1 was signalled in
    assert state["global_step"] == 3
    assert f"SIGTERM: stopped at global step 3 and saved {run_dir}" in output
    assert [(tmp_path / f"trained_rank{rank}").read_text() for rank in (0, 1)] == ["3", "3"]
    resumed = subprocess.run(
        [sys.executable, str(script), str(run_dir), "resume"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # each rank trained the one step left
    assert [(tmp_path / f"trained_rank{rank}").read_text() for rank in (0, 1)] == ["1", "1"]


@pytest.mark.slow
def test_torchrun_stops_every_rank_on_sigterm_and_resumes(tmp_path):
    """train.py under torchrun (Lightning's torchelastic environment): a SIGTERM to torchrun,
    which passes it on to its workers, stops both ranks after the same step with last.ckpt
    saved; the same torchrun command with resume=auto continues from there to the end."""
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith("trainer.max_epochs=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(ROOT / "train.py"), *overrides,
               "trainer.max_epochs=4", "trainer.devices=2", "trainer.strategy=ddp",
               "cpu_threads=1", "resume=auto",
               "+callbacks.sig._target_=helpers.pipeline.SignalOnce", "+callbacks.sig.step=2",
               f"+callbacks.sig.marker={tmp_path / 'signalled'}", "+callbacks.sig.to=parent",
               "+callbacks.sig.rank=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}  # fmt: skip
    stopped = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, output[-3000:]  # torchrun reports the signal it got
    assert "Received 15 death signal" in output, output[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    step = state["global_step"]  # 8 images, 4 per step: 2 steps per epoch, 8 in all
    assert 2 <= step < 8, output[-3000:]
    assert f"SIGTERM: stopped at global step {step} and saved" in output, output[-3000:]
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert (
        f"resuming {run_dir / 'checkpoints' / 'last.ckpt'} (epoch {state['epoch']}, "
        f"global step {step})" in output
    )
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [0, 1, 2, 3]


def _trainer(tmp_path, *overrides: str):
    return build_trainer(compose_config("train", tiny_overrides(tmp_path, *overrides)))


def test_torchrun_processes_must_match_the_trainers_devices(tmp_path, monkeypatch):
    """Under torchrun a trainer of one device would train once per process, independently,
    each with the whole batch, into one run dir: refused, naming the settings to pass."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    ddp = "trainer.strategy=ddp"
    with pytest.raises(SetupError, match=r"trainer.devices=2 \(torchrun's --nproc_per_node\) "
                                         r"and trainer.num_nodes=2 \(its --nnodes\)"):  # fmt: skip
        _trainer(tmp_path)  # devices=1, num_nodes=1
    with pytest.raises(SetupError, match="torchrun started 4 processes"):
        _trainer(tmp_path, "trainer.devices=2", ddp)  # one node of two
    trainer = _trainer(tmp_path, "trainer.devices=2", "trainer.num_nodes=2", ddp)
    assert trainer.world_size == 4  # the ranks are torchrun's
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # not under torchrun: Lightning's own launcher
    _trainer(tmp_path, "trainer.devices=2", ddp)


_SLURM = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_NUM_TASKS": "2",
          "SLURM_JOB_NAME": "detr",
          "SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
          "SLURM_NODELIST": "node1"}  # fmt: skip


def test_srun_tasks_must_match_the_trainers_devices(tmp_path, monkeypatch):
    """Under SLURM Lightning takes the ranks from srun and starts no process: 2 tasks with a
    trainer of 1 device would be 2 independent runs, 1 task with 2 devices one process with
    the whole batch. A batch script's own shell (no srun step) may run one process."""
    for key, value in _SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SetupError, match=r"srun started 2 tasks, but the trainer has 1 device"):
        _trainer(tmp_path)
    trainer = _trainer(tmp_path, "trainer.devices=2", "trainer.strategy=ddp")
    environment = trainer.strategy.cluster_environment
    assert trainer.world_size == 2 and environment.creates_processes_externally
    assert not environment.auto_requeue  # the stop is SignalStop's
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # the batch script's own shell
    assert _trainer(tmp_path).world_size == 1  # python eval.py ... in it: one process
    with pytest.raises(SetupError, match="this process is not an srun task"):
        _trainer(tmp_path, "trainer.devices=2", "trainer.strategy=ddp")
    for key in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(key, "1")
    with pytest.raises(SetupError, match="srun started 1 tasks, but the trainer has 2"):
        _trainer(tmp_path, "trainer.devices=2", "trainer.strategy=ddp")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's own processes
    trainer = _trainer(tmp_path, "trainer.devices=2", "trainer.strategy=ddp")
    assert not trainer.strategy.cluster_environment.creates_processes_externally
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun -n 2 in it: 2 separate runs
    with pytest.raises(SetupError, match="srun started 2 tasks in the job 'interactive'"):
        _trainer(tmp_path)


def test_the_local_launcher_runs_one_device_per_job(tmp_path, monkeypatch):
    """A job of hydra/launcher=local is one process; Lightning cannot start DDP processes in it
    (it would run submitit's entry point again): refused with what to do instead."""
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "123")
    with pytest.raises(SetupError, match="hydra/launcher=local runs each job as one process"):
        _trainer(tmp_path, "trainer.devices=2", "trainer.strategy=ddp")
    _trainer(tmp_path)
