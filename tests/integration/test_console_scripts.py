"""The installed commands work from any directory (the configs ship inside the package), and
the wheel carries every config file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import ROOT
from helpers.data import write_image
from helpers.pipeline import TINY_DATA, TINY_MODEL

CONF = ROOT / "src" / "detr_lightning" / "conf"
BIN = Path(sys.executable).parent
COMMANDS = (
    "detr-train",
    "detr-eval",
    "detr-predict",
    "detr-export",
    "detr-validate",
    "detr-convert",
    "detr-preview",
    "detr-tune",
)


def _start(command: str, *args: str, cwd: Path) -> subprocess.Popen:
    """``command`` as a user runs it: from ``cwd``, with no path into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([str(BIN / command), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _finish(process: subprocess.Popen) -> str:
    """Its standard output, once it exited with 0."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


@pytest.mark.slow
def test_every_command_runs_outside_the_checkout(tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    for command in COMMANDS:
        assert (BIN / command).is_file(), f"{command} is not installed (pip install -e .)"
    # the commands that need no checkpoint run beside the training, those that need one after
    train = _start("detr-train", *TINY_MODEL, *TINY_DATA, "trainer=cpu", "trainer.max_epochs=1",
                   "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
                   "run_dir=run", cwd=tmp_path)  # fmt: skip
    validate = _start("detr-validate", *TINY_DATA, "--no-decode", cwd=tmp_path)
    preview = _start("detr-preview", *TINY_DATA, "num_samples=2", "tile_size=64", cwd=tmp_path)
    _finish(train)
    assert "OK:" in _finish(validate)
    assert "wrote preview.png: 2 training samples" in _finish(preview)
    assert (tmp_path / "preview.png").is_file()  # in the current directory
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()  # Hydra's files follow run_dir
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png", 90, 70)
    running = [
        _start("detr-eval", f"ckpt_path={checkpoint}", "run_dir=eval",
               "trainer.enable_progress_bar=false", cwd=tmp_path),
        _start("detr-predict", f"pretrained={checkpoint}", f"input={images}", "run_dir=predict",
               "threshold=0.0", "draw=false", cwd=tmp_path),
        _start("detr-export", f"ckpt_path={checkpoint}", "format=torchscript",
               "example_size=[64,64]", "output=model.pt", "run_dir=export", cwd=tmp_path),
    ]  # fmt: skip
    for process in running:
        _finish(process)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    (record,) = json.loads((tmp_path / "predict" / "detections.json").read_text())
    assert record["file_name"].endswith("a.png") and len(record["detections"]) > 0
    logits, _ = torch.jit.load(str(tmp_path / "model.pt"))(
        torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    )
    assert logits.shape[-1] == 4  # 3 synthetic categories + no object


def test_detr_convert_runs_outside_the_checkout(tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    assert (BIN / "detr-convert").is_file(), "detr-convert is not installed (pip install -e .)"
    for split in ("train", "val"):
        (tmp_path / "yolo" / "images" / split).mkdir(parents=True)
        (tmp_path / "yolo" / "labels" / split).mkdir(parents=True)
        write_image(tmp_path / "yolo" / "images" / split / "a.png", 90, 70)
        (tmp_path / "yolo" / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (tmp_path / "yolo" / "classes.txt").write_text("cat\n")
    convert = _start("detr-convert", "format=yolo", "input=yolo", "output=coco", cwd=tmp_path)
    assert "OK:" in _finish(convert)  # the dataset check of the output ran and passed
    dataset = json.loads((tmp_path / "coco/annotations/instances_val2017.json").read_text())
    assert dataset["categories"] == [{"id": 1, "name": "cat"}]
    assert [a["bbox"] for a in dataset["annotations"]] == [[27.0, 21.0, 36.0, 28.0]]


def test_the_wheel_holds_every_config(tmp_path):
    # built from a copy: a build in place would leave build/ and *.egg-info in the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("detr_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"detr_lightning/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert len(configs) > 30 and configs <= names, sorted(configs - names)
    assert "detr_lightning/conf/__init__.py" in names  # what pkg://detr_lightning.conf imports
