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
from helpers.data import write_coco

SRC = ROOT / "src"
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def write_clean(root: Path) -> None:
    """Both splits: 3 train images (one empty), 2 val images, boxes well inside."""
    train_images = [
        {"id": 1, "width": 100, "height": 50},
        {"id": 2, "width": 64, "height": 64},
        {"id": 3, "width": 40, "height": 40},
    ]
    train_annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 10.0]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50.0, 0.0, 50.0, 50.0]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0.0, 0.0, 64.0, 64.0]},
    ]
    write_coco(root, train_images, train_annotations, CATEGORIES, split="train")
    val_images = [{"id": 10, "width": 80, "height": 60}, {"id": 11, "width": 30, "height": 30}]
    val_annotations = [
        {"id": 10, "image_id": 10, "category_id": 1, "bbox": [1.0, 1.0, 30.0, 30.0]},
        {"id": 11, "image_id": 11, "category_id": 2, "bbox": [0.0, 0.0, 30.0, 30.0]},
    ]
    write_coco(root, val_images, val_annotations, CATEGORIES, split="val")


def write_broken(root: Path) -> None:
    """A clean val split and a train split with one of each problem."""
    write_clean(root)
    images = [
        {"id": 1, "width": 100, "height": 50},
        {"id": 2, "width": 64, "height": 64, "file_name": "gone.jpg"},  # deleted below
        {"id": 3, "width": 64, "height": 64, "file_name": "corrupt.jpg"},  # garbage below
        {"id": 3, "width": 64, "height": 64, "file_name": "again.jpg"},  # duplicate id
    ]
    annotations = [
        {"id": 21, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 0.0, 5.0]},  # w = 0
        {"id": 22, "image_id": 1, "category_id": 1, "bbox": [90.0, 40.0, 20.0, 20.0]},  # outside
        {"id": 23, "image_id": 1, "category_id": 99, "bbox": [1.0, 1.0, 5.0, 5.0]},  # category
        {"id": 24, "image_id": 7, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0]},  # image
        {"id": 25, "image_id": 1, "category_id": 2, "bbox": [1.0, 1.0, 5.0, 5.0]},
        {"id": 25, "image_id": 1, "category_id": 2, "bbox": [2.0, 2.0, 5.0, 5.0]},  # same id
    ]
    image_dir, _ = write_coco(root, images, annotations, CATEGORIES, split="train")
    (image_dir / "gone.jpg").unlink()
    (image_dir / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")


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
