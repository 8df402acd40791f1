"""Checkpoint IO: atomic writes, loads that run no code, contents handed over read once."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import detr_lightning.utils.io
from detr_lightning.checkpoints.reading import CheckpointError
from detr_lightning.checkpoints.run_files import LoadedCheckpoint, file_identity
from detr_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from helpers.runs import Opaque, training_state


def test_checkpoint_io_is_atomic_and_loads_no_code(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(training_state(1), path)
    assert io.load_checkpoint(path)["global_step"] == 1

    def killed_mid_save(obj, target):
        Path(target).write_bytes(b"PK\x03\x04 the first bytes of a zip")
        raise KeyboardInterrupt  # stands in for the process dying during the write

    monkeypatch.setattr(torch, "save", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(training_state(2), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous file, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    # the data reach the disk before the rename makes them visible
    synced = []
    monkeypatch.setattr(detr_lightning.utils.io.os, "fsync", lambda fd: synced.append(fd))
    io.save_checkpoint(training_state(3), path)
    assert len(synced) >= 1
    monkeypatch.undo()

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({**training_state(1), "x": Opaque()}, unsafe)
    with pytest.raises(CheckpointError, match=r"refused to load"):
        io.load_checkpoint(unsafe, weights_only=False)  # the caller cannot turn it off


def test_a_checkpoint_handed_over_is_not_read_again(tmp_path, monkeypatch):
    """train() hands the checkpoint it resumes, already read, to Lightning's load: used once,
    for that file only, not if the file changed after it was read, not across a pickle
    (ddp_spawn ranks), and dropped by forget()."""
    path = tmp_path / "last.ckpt"
    torch.save(training_state(1), path)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    io = AtomicCheckpointIO()

    handed = LoadedCheckpoint(path, file_identity(path), training_state(1))
    io.hand_over(handed)
    assert pickle.loads(pickle.dumps(io))._handed is None
    assert io.load_checkpoint(str(tmp_path / "." / "last.ckpt")) is handed.state  # same file
    assert reads == []
    assert io.load_checkpoint(path)["global_step"] == 1  # once only
    assert reads == [path]

    io.hand_over(handed)
    other = tmp_path / "other.ckpt"
    torch.save(training_state(2), other)
    assert io.load_checkpoint(other)["global_step"] == 2  # another file is read
    assert io.load_checkpoint(path) is not handed.state  # and the hand-over is gone

    io.hand_over(handed)
    io.forget()
    assert io.load_checkpoint(path) is not handed.state

    torch.save(training_state(3), path)  # rewritten after it was read, before the hand-over
    os.utime(path, ns=(1, 1))
    io.hand_over(handed)
    assert io.load_checkpoint(path)["global_step"] == 3
    read = LoadedCheckpoint.read(path)  # the identity is taken before the contents
    assert read.identity == file_identity(path) and read.state["global_step"] == 3
