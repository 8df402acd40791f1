"""detr-validate: exit status, setup problems and the command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from detr_lightning.cli.validate import main
from detr_lightning.tools.dataset_check import TrainingPlan
from helpers import ROOT
from helpers.data import write_broken

SRC = ROOT / "src"


def test_exit_status_and_no_decode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_broken(tmp_path)
    assert main([f"data.root={tmp_path}", "--no-decode", "max_examples=1"]) == 1
    out = capsys.readouterr().out
    assert "undecodable" not in out and "corrupt.jpg" not in out  # decoding skipped
    assert "gone.jpg (image 2)" in out and "images not decoded (decode=false)" in out


def test_epoch_advice_names_lr_drop_only_for_a_schedule_that_has_it() -> None:
    from detr_lightning.cli.config import compose_config
    from detr_lightning.cli.validate import training_plan
    from detr_lightning.tools.advice import _schedule

    # 2000 images in batches of 4: 500 steps per epoch, 10 epochs for 5000 steps
    step = TrainingPlan(batch_size=4, max_epochs=1, pretrained="detr.pth", lr_drop=True)
    assert "trainer.max_epochs=10 with schedule.lr_drop=8." in " ".join(_schedule(2000, step))
    cosine = TrainingPlan(batch_size=4, max_epochs=1, pretrained="detr.pth", lr_drop=False)
    advice = " ".join(_schedule(2000, cosine))
    assert "trainer.max_epochs=10 (the schedule follows" in advice and "lr_drop" not in advice
    # what each config's schedule is: the paper's step schedule, the CPU demo's cosine
    assert training_plan(compose_config("validate", ["data=synthetic"])).lr_drop
    assert not training_plan(compose_config("validate", ["experiment=synthetic_cpu"])).lr_drop


def test_setup_problems_exit_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.delenv("COCO_ROOT", raising=False)
    assert main([]) == 2
    assert "error: no dataset: set data.root=" in capsys.readouterr().err
    assert main([f"data.root={tmp_path}", "data.nonsense_key=1"]) == 2
    assert "nonsense_key" in capsys.readouterr().err
    # the run would fail at once: so does its check
    missing = tmp_path / "weights" / "detr-r50.pth"
    assert main([f"data.root={tmp_path}", f"pretrained={missing}", "decode=false"]) == 2
    assert f"error: pretrained={missing}: no such file" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning (~10-30 s)
def test_command_line_in_a_subprocess(tmp_path: Path) -> None:
    write_broken(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "detr_lightning.cli.validate", f"data.root={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "corrupt.jpg (image 3)" in result.stdout
        and "annotation 23: category_id 99" in result.stdout
    )
    assert result.stdout.rstrip().endswith("FAILED: 5 errors, 3 warnings, 1 note")
    assert "RuntimeWarning" not in result.stderr  # the module is not imported twice
