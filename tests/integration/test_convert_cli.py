"""detr-convert: exit status, the printed summary and check, and a converted dataset that
trains."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl

from detr_lightning.cli.convert import main
from detr_lightning.cli.train import train
from detr_lightning.data.synthetic import generate_synthetic_coco
from detr_lightning.tools.converters import ANNOTATION_FILES
from helpers.data import write_image
from helpers.pipeline import RecordBatches, compose_config, tiny_overrides


def write_yolo(coco_root: Path, target: Path) -> list[str]:
    """The COCO dataset at ``coco_root`` as a YOLO one (data.yaml, images/, labels/); returns
    the class names in category-id order."""
    names: list[str] = []
    for split in ("train", "val"):
        dataset = json.loads((coco_root / f"annotations/instances_{split}2017.json").read_text())
        categories = sorted(dataset["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in categories]
        label_of = {c["id"]: index for index, c in enumerate(categories)}
        entries = {e["id"]: e for e in dataset["images"]}
        lines: dict[int, list[str]] = {image_id: [] for image_id in entries}
        for ann in dataset["annotations"]:
            entry = entries[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            width, height = entry["width"], entry["height"]
            values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
            line = " ".join([str(label_of[ann["category_id"]]), *map(repr, values)])
            lines[ann["image_id"]].append(line)
        for image_id, entry in entries.items():
            name = Path(entry["file_name"])
            (target / "images" / split).mkdir(parents=True, exist_ok=True)
            (target / "labels" / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(coco_root / f"{split}2017" / name, target / "images" / split / name)
            label = target / "labels" / split / name.with_suffix(".txt")
            label.write_text("\n".join(lines[image_id]))
    names_yaml = json.dumps(names)
    (target / "data.yaml").write_text(
        f"path: .\ntrain: images/train\nval: images/val\nnames: {names_yaml}\n"
    )
    return names


def test_setup_problems_exit_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["format=csv", f"input={tmp_path}", f"output={out}"]) == 2
    assert "error: format=csv: choose format=yolo or format=voc" in capsys.readouterr().err
    assert main(["format=yolo"]) == 2
    assert "input=DIR output=DIR" in capsys.readouterr().err
    assert main(["format=voc", f"input={tmp_path / 'missing'}", f"output={out}"]) == 2
    assert f"error: input={tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main(["format=yolo", "nonsense_key=1"]) == 2
    assert "nonsense_key" in capsys.readouterr().err
    assert not out.exists()


def test_voc_command_prints_the_summary_and_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "voc"
    src.mkdir()
    for index, (name, box) in enumerate([("cat", (1, 1, 20, 10)), ("dog", (5, 5, 30, 15))]):
        for copy in range(2):
            stem = f"{index}{copy}"
            write_image(src / f"{stem}.jpg", 40, 20)
            (src / f"{stem}.xml").write_text(
                f"<annotation><object><name>{name}</name><difficult>0</difficult><bndbox>"
                f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax>"
                f"<ymax>{box[3]}</ymax></bndbox></object></annotation>"
            )
    (tmp_path / "names.txt").write_text("dog\ncat\n")
    out = tmp_path / "out"
    argv = ["format=voc", f"input={src}", f"output={out}", f"classes={tmp_path / 'names.txt'}",
            "val_fraction=0.25", "seed=3"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "categories: 1 dog, 2 cat" in printed
    assert "train: 3 images (0 without objects), 3 objects" in printed
    assert f"check of {out} (detr-validate data.root={out}):" in printed
    # one val image, of one class: the other has no AP there (a note)
    assert printed.rstrip().endswith("OK: 0 errors, 0 warnings, 1 note")
    val = json.loads((out / "annotations/instances_val2017.json").read_text())
    assert len(val["images"]) == 1 and len(val["annotations"]) == 1
    # the output is not empty now
    assert main(argv) == 2
    assert "is not empty" in capsys.readouterr().err
    # no val split: converted, but the check fails (training needs one)
    assert main([*argv[:3], "overwrite=true", "val_fraction=0", "decode=false"]) == 1
    printed = capsys.readouterr().out
    assert "val: not written" in printed and "FAILED: 1 error" in printed


class ClassNames(pl.Callback):
    """Records the trained module's class names."""

    names: list[str] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.names = list(pl_module.class_names)


@pytest.mark.slow  # a tiny training run (~10-30 s on a CPU)
def test_a_converted_yolo_dataset_trains(tmp_path: Path) -> None:
    coco = generate_synthetic_coco(tmp_path / "coco", num_train=8, num_val=4, min_size=64,
                                   max_size=96, num_categories=3, seed=0)  # fmt: skip
    names = write_yolo(coco, tmp_path / "yolo")
    out = tmp_path / "converted"
    assert main(["format=yolo", f"input={tmp_path / 'yolo'}", f"output={out}"]) == 0
    train_ids = {
        e["id"] for e in json.loads((out / ANNOTATION_FILES["train"]).read_text())["images"]
    }
    assert train_ids == set(range(1, 9))

    batches, classes = RecordBatches(), ClassNames()
    cfg = compose_config(
        "train", tiny_overrides(tmp_path / "run", f"data.root={out}", "trainer.max_epochs=1")
    )
    metrics = train(cfg, [batches, classes])
    assert len(batches.losses) == 2 and all(math.isfinite(loss) for loss in batches.losses)
    assert {image_id for _, ids in batches.steps for image_id in ids} == train_ids
    assert classes.names == names  # the converted categories, in the source's class order
    assert 0.0 <= metrics["map"] <= 1.0  # the val split was evaluated
