"""The files of a training run: resume=auto takes the newest checkpoint that loads."""

from __future__ import annotations

import pytest

from detr_lightning.checkpoints.run_files import load_resume_checkpoint
from detr_lightning.utils.errors import SetupError
from helpers.runs import Opaque, training_state, write


def test_resume_auto_takes_the_newest_checkpoint_that_loads(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    older = write(checkpoints / "best-epoch000.ckpt", training_state(4), 1000)
    write(checkpoints / "last.ckpt", training_state(6), 2000)
    # newer, but cut short by a crash (not by our writer, which never leaves one)
    truncated = write(tmp_path / "hpc_ckpt_1.ckpt", training_state(8), 3000)
    truncated.write_bytes(truncated.read_bytes()[:200])
    code = write(checkpoints / "odd.ckpt", {**training_state(9), "x": Opaque()}, 4000)
    weights_only = write(checkpoints / "weights.ckpt", {"state_dict": {}}, 5000)
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
    write(tmp_path / "hpc_ckpt_2.ckpt", training_state(10), 6000)
    assert load_resume_checkpoint(tmp_path).path == tmp_path / "hpc_ckpt_2.ckpt"

    # nothing at all: a new run; checkpoints that all fail: an error naming them
    assert load_resume_checkpoint(tmp_path / "new") is None
    for path in (older, checkpoints / "last.ckpt", tmp_path / "hpc_ckpt_2.ckpt"):
        path.unlink()
    with pytest.raises(SetupError, match=r"none of the 3 checkpoints(.|\n)*hpc_ckpt_1\.ckpt"):
        load_resume_checkpoint(tmp_path)
