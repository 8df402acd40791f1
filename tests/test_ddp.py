"""DDP on CPU (gloo), launched through train.py as a user would: one flag, one run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_fixtures import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_on_cpu_through_train_py(tmp_path):
    overrides = [
        o for o in tiny_overrides(Path("unused")) if not o.startswith(("run_dir", "trainer.max"))
    ]
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
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
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    # 8 training images, 2 ranks x 2 per device: 2 steps per epoch, all 8 images counted
    output = result.stdout + result.stderr + (run_dir / "train.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # two processes trained
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    import torch

    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    assert state["global_step"] == 2 * 2  # 2 epochs x (8 images / global batch 4)
