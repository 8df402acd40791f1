"""DDP on CPU (gloo), launched through train.py as a user would: one flag, one run dir; and no
rank skips a step when its whole batch is unreadable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import make_tiny_synthetic
from pipeline_fixtures import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


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
