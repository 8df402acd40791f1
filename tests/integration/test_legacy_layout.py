"""A run written by the first, flat package layout (tests/fixtures/legacy_run) still loads,
resumes from its own .hydra/config.yaml, evaluates and exports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detr_lightning as dl
from helpers import ROOT

LEGACY = ROOT / "tests" / "fixtures" / "legacy_run"
CHECKPOINT = LEGACY / "checkpoints" / "last.ckpt"
# the run's backbone.weights file is not part of the fixture: the checkpoint holds the weights
NO_BACKBONE_FILE = "backbone.weights=null"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_the_legacy_checkpoint_loads_with_its_labels():
    module = dl.load_pretrained(CHECKPOINT)
    assert module.model.num_classes == 3 and module.model.num_queries == 8
    assert module.label_map["names"] == ["red rectangle", "green ellipse", "blue triangle"]
    saved = torch.load(CHECKPOINT, weights_only=True)["state_dict"]
    ours = module.state_dict()
    for key, value in saved.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.slow
def test_the_legacy_run_resumes_from_its_own_config(tmp_path):
    """train.py with the run's .hydra/config.yaml as its config continues the run."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(CHECKPOINT, run_dir / "checkpoints" / "last.ckpt")
    _run("train.py", "--config-path", str(LEGACY / ".hydra"), "--config-name", "config",
         f"run_dir={run_dir}", "resume=auto", "trainer.max_epochs=2", NO_BACKBONE_FILE,
         cwd=tmp_path)  # fmt: skip
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (1, 4)
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [0, 1]  # the first from the checkpoint


@pytest.mark.slow
def test_the_legacy_checkpoint_evaluates_and_exports(tmp_path):
    _run("eval.py", f"ckpt_path={CHECKPOINT}", f"run_dir={tmp_path / 'eval'}",
         "trainer.enable_progress_bar=false", cwd=tmp_path)  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["map"] <= 1.0
    _run("export.py", f"ckpt_path={CHECKPOINT}", "format=torchscript", "example_size=[64,64]",
         f"output={tmp_path / 'model.pt'}", f"run_dir={tmp_path / 'export'}",
         cwd=tmp_path)  # fmt: skip
    graph = torch.jit.load(str(tmp_path / "model.pt"))
    logits, boxes = graph(torch.zeros(1, 3, 64, 80), torch.zeros(1, 64, 80, dtype=torch.bool))
    assert logits.shape == (1, 8, 4) and boxes.shape == (1, 8, 4)
