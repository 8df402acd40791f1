"""The files of a training run: resume=auto takes the newest checkpoint that loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from detr_lightning.checkpoints.run_files import (
    load_resume_checkpoint,
)
from detr_lightning.utils.errors import SetupError


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
