"""What the tests of a run's checkpoints, resume and stops share: training states written by
hand, the training command in a subprocess, and readers of the run's logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import ROOT
from helpers.pipeline import tiny_overrides


def training_state(step: int) -> dict:
    """A stand-in for a Lightning training checkpoint (the keys resume=auto requires)."""
    return {"state_dict": {"w": torch.full((2,), float(step))}, "optimizer_states": [],
            "loops": {}, "global_step": step, "epoch": 0}  # fmt: skip


def write(path: Path, obj: object, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    os.utime(path, (mtime, mtime))
    return path


class Opaque:
    """Pickled as a class reference: a weights_only load refuses it."""


# what srun sets for a one-task job
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "detr", "SLURM_JOB_ID": "42",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip


# ------------------------------------------------------------------------ real processes
def train_command(*extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(Path("unused")) if not o.startswith("run_dir")]
    return [sys.executable, str(ROOT / "train.py"), *overrides, "cpu_threads=1", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"train.py ended early:\n{process.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for train.py")
        time.sleep(0.05)


def loss_rows(run_dir: Path) -> dict[int, str]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss_step")]
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {int(row["step"]): row["train/loss_step"] for row in rows}


def history(run_dir: Path) -> list[tuple]:
    """(epoch, training loss, images evaluated, mAP) of every entry of metrics.json."""
    entries = json.loads((run_dir / "metrics.json").read_text())["history"]
    return [(e["epoch"], e["train_loss"], e.get("num_images"), e.get("map")) for e in entries]


def epoch_rows(run_dir: Path) -> dict[int, str]:
    """metrics.csv's epoch means of the training loss, by epoch."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return {int(row["epoch"]): row["train/loss"] for row in csv.DictReader(file)
                if row.get("train/loss")}  # fmt: skip
