"""detr-eval (eval.py) and the evaluation of a training run: artifacts, the repeated
validation, the confusion matrix, two processes giving the results of one, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_lightning.cli.eval import confusion_settings, evaluate
from detr_lightning.cli.train import train
from detr_lightning.data.synthetic import ensure_synthetic_coco
from detr_lightning.evaluation.evaluator import COCO_METRIC_KEYS, coco_eval_file
from detr_lightning.utils.errors import SetupError
from detr_lightning.viz.confusion_figure import confusion_figure_size
from helpers import ROOT
from helpers.pipeline import compose_config, tiny_overrides


def test_eval_config_with_a_data_group_states_every_setting(monkeypatch):
    """`eval.py ckpt_path=... data=coco data.root=R data.val_size=128 data.max_size=160`: the
    group's values replace the checkpoint's, training-only keys are dropped, and a long-side
    cap below the short side is valid."""
    from omegaconf import OmegaConf

    from detr_lightning.cli.eval import EVAL_DATA_KEYS, evaluation_data

    monkeypatch.delenv("COCO_ROOT", raising=False)
    overrides = ["data=coco", "data.root=/r", "data.val_size=128", "data.max_size=160", "run_dir=x"]
    given = OmegaConf.to_container(compose_config("eval", overrides).data, resolve=True)
    stored = {"root": None, "synthetic": {"num_val": 4}, "val_size": 80, "max_size": 128,
              "val_batch_size": 4, "label_mapping": "contiguous"}  # fmt: skip
    settings = evaluation_data(stored, given)
    assert set(settings) <= set(EVAL_DATA_KEYS)
    assert (settings["root"], settings["synthetic"]) == ("/r", None)
    assert (settings["val_size"], settings["max_size"]) == (128, 160)
    assert settings["label_mapping"] == "category_id"  # data=coco's, stated by the group
    assert settings["val_batch_size"] == 4  # the group leaves it null: the checkpoint's
    # without a group, nothing is stated: every value is the checkpoint's
    plain = OmegaConf.to_container(compose_config("eval", ["run_dir=x"]).data, resolve=True)
    assert evaluation_data(stored, plain) == stored


# ------------------------------------------------------------------------- on a trained run
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny DETR trained for 60 epochs (120 steps) on 8 synthetic images, validated at 30 and
    60, with data.* overrides that an evaluation must not need to repeat. Enough for it to find
    the training images' objects (COCO AP ~0.1 on them), so that comparisons of metrics are not
    comparisons of zeros. Trained once per test session: xdist workers share it through a lock
    in their common temporary folder."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same for every xdist worker
    run_dir = shared / "trained_run"
    with FileLock(str(shared / "trained_run.lock")):
        if not (run_dir / "done").is_file():
            _train_tiny_run(run_dir)
            (run_dir / "done").write_text("ok")
    return run_dir


def _train_tiny_run(run_dir: Path) -> None:
    cfg = compose_config(
        "train",
        tiny_overrides(
            run_dir,
            "trainer.max_epochs=60",
            "trainer.check_val_every_n_epoch=30",
            "trainer.gradient_clip_val=null",  # clipping at 0.1 stalls a random backbone
            "callbacks=default",
            "callbacks.progress_bar=null",
            "model.hidden_dim=64",
            "model.nheads=4",
            "model.dropout=0.0",
            "optimizer.lr=5e-4",
            "backbone.lr=5e-4",
            "data.scales=[80]",
            "data.crop=false",
        ),
    )
    train(cfg)


def metrics_annotations(run_dir: Path) -> Path:
    """The validation annotation file of the run (from the synthetic cache)."""
    cfg = compose_config("train", tiny_overrides(run_dir))
    return ensure_synthetic_coco(**cfg.data.synthetic) / "annotations" / "instances_val2017.json"


@pytest.mark.slow
def test_train_writes_run_artifacts(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(COCO_METRIC_KEYS) <= set(metrics)
    assert metrics["num_images"] == 4 and metrics["skipped_images"] == 0
    names = {c["name"] for c in json.loads(Path(metrics_annotations(trained_run)).read_text())[
        "categories"]}  # fmt: skip
    assert {e["name"] for e in metrics["per_class_ap"]} == names and len(names) == 3
    assert [entry["epoch"] for entry in metrics["history"]] == list(range(60))
    for entry in metrics["history"]:
        assert entry["train_loss"] > 0 and entry["train_seconds"] > 0
        assert entry["train_images_per_s"] > 0 and entry["peak_memory_mb"] > 0
        # validation ran after epochs 30 and 60 only
        assert (set(COCO_METRIC_KEYS) <= set(entry)) == (entry["epoch"] in (29, 59))
    assert metrics["map"] == metrics["history"][-1]["map"]
    assert (trained_run / "curves.png").stat().st_size > 10_000
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best-") for p in (trained_run / "checkpoints").iterdir())


def eval_config(trained_run: Path, run_dir: Path, *overrides: str):
    """eval.yaml for the trained run's last checkpoint, results in ``run_dir``."""
    return compose_config(
        "eval",
        [
            *overrides,
            "trainer.enable_progress_bar=false",
            f"run_dir={run_dir}",
            f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        ],
    )


@pytest.mark.slow
def test_eval_repeats_the_validation_without_data_overrides(trained_run, tmp_path, malloc_calls):
    """The run used data.* overrides (sizes, synthetic parameters); eval.py needs none."""
    evaluated = evaluate(eval_config(trained_run, tmp_path))
    assert malloc_calls == ["reuse"]  # a CPU run sets malloc to reuse freed memory
    trained = json.loads((trained_run / "metrics.json").read_text())
    for key in COCO_METRIC_KEYS:
        assert evaluated[key] == trained[key], key
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["data"]["val_size"] == 80 and written["data"]["max_size"] == 128
    assert written["data"]["synthetic"]["num_val"] == 4


@pytest.mark.slow
def test_eval_on_the_training_images_matches_pycocotools(trained_run, tmp_path, malloc_calls):
    """On the images it was trained on the metrics are far from zero, so the comparison with
    pycocotools on the written results file means something."""
    evaluated = evaluate(
        eval_config(
            trained_run,
            tmp_path,
            "data.val_images=train2017",
            "data.val_annotations=annotations/instances_train2017.json",
            "reuse_freed_memory=false",
        )
    )
    assert malloc_calls == []
    written = json.loads((tmp_path / "metrics.json").read_text())
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score"} == set(predictions[0])
    annotations = json.loads(Path(written["annotations"]).read_text())
    assert {p["category_id"] for p in predictions} <= {c["id"] for c in annotations["categories"]}
    reference = coco_eval_file(written["annotations"], tmp_path / "predictions.json")
    ours = [written[key] for key in COCO_METRIC_KEYS]
    # logged as float32: the only difference to COCOeval's float64 is that rounding
    assert max(abs(a - b) for a, b in zip(ours, reference)) <= 1e-6, (ours, reference)
    assert sum(value > 0 for value in reference) >= 3, reference
    assert evaluated["map"] == written["map"]


def confusion_totals(annotation_file: Path, predictions: list[dict], image_ids, threshold: float):
    """Per category id: the non-crowd objects of ``image_ids`` and the predictions with a score
    of at least ``threshold``, counted from the files."""
    data = json.loads(Path(annotation_file).read_text())
    categories = sorted(c["id"] for c in data["categories"])
    objects = [a["category_id"] for a in data["annotations"]
               if a["image_id"] in image_ids and not a.get("iscrowd", 0)]  # fmt: skip
    kept = [p["category_id"] for p in predictions if p["score"] >= threshold]
    return [objects.count(c) for c in categories], [kept.count(c) for c in categories]


@pytest.mark.slow
def test_eval_writes_the_confusion_matrix(trained_run, tmp_path):
    """On the training images, at a lowered score threshold: every object is in its class's
    row, every kept prediction in its class's column, and some are found."""
    overrides = ("data.val_images=train2017",
                 "data.val_annotations=annotations/instances_train2017.json",
                 "reuse_freed_memory=false")  # fmt: skip
    evaluate(eval_config(trained_run, tmp_path, *overrides, "confusion.score_threshold=0.3"))
    written = json.loads((tmp_path / "confusion_matrix.json").read_text())
    annotation_file = json.loads((tmp_path / "metrics.json").read_text())["annotations"]
    annotations = json.loads(Path(annotation_file).read_text())
    names = [c["name"] for c in sorted(annotations["categories"], key=lambda c: c["id"])]
    assert written["class_names"] == [*names, "background"]
    assert (written["score_threshold"], written["iou_threshold"]) == (0.3, 0.5)
    all_images = {image["id"] for image in annotations["images"]}
    assert written["num_images"] == len(all_images) == 8
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    objects, kept = confusion_totals(annotation_file, predictions, all_images, 0.3)
    counts = np.array(written["counts"])
    assert counts[:-1].sum(1).tolist() == objects and sum(objects) > 0
    assert counts[:, :-1].sum(0).tolist() == kept and sum(kept) > 0
    assert written["num_ground_truth"] == sum(objects) and written["num_predictions"] == sum(kept)
    all_objects = sum(objects)
    assert np.trace(counts) > 0  # the model finds some objects as their class
    normalized = np.array(written["normalized"])
    rows = counts.sum(1) > 0
    np.testing.assert_allclose(normalized[rows].sum(1), 1.0)
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        width, height = confusion_figure_size(written["class_names"])
        assert png.size == (round(width * 100), round(height * 100))

    # one batch of two images: the matrix counts the objects of those two only, as COCOeval
    part = tmp_path / "part"
    evaluate(eval_config(trained_run, part, *overrides, "trainer.limit_test_batches=1",
                         "data.val_batch_size=2"))  # fmt: skip
    written = json.loads((part / "confusion_matrix.json").read_text())
    assert json.loads((part / "metrics.json").read_text())["num_images"] == 2
    assert written["num_images"] == 2 and written["score_threshold"] == 0.5
    first_two = {image["id"] for image in annotations["images"][:2]}
    predictions = json.loads((part / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= first_two
    objects, kept = confusion_totals(annotation_file, predictions, first_two, 0.5)
    counts = np.array(written["counts"])
    assert counts[:-1].sum(1).tolist() == objects and 0 < sum(objects) < all_objects
    assert counts[:, :-1].sum(0).tolist() == kept


def test_confusion_settings_are_checked_before_the_evaluation():
    assert confusion_settings(compose_config("eval", ["run_dir=x"])) == {
        "score_threshold": 0.5, "iou_threshold": 0.5}  # fmt: skip
    given = ["run_dir=x", "confusion.score_threshold=0.25", "confusion.iou_threshold=0.75"]
    assert confusion_settings(compose_config("eval", given)) == {
        "score_threshold": 0.25, "iou_threshold": 0.75}  # fmt: skip
    assert confusion_settings(compose_config("eval", ["run_dir=x", "confusion=null"])) is None
    bad_values = {"iou_threshold=0": r"iou_threshold must lie in \(0, 1\], got 0.0",
                  "score_threshold=high": "could not convert string to float"}  # fmt: skip
    for bad, message in bad_values.items():
        cfg = compose_config("eval", ["run_dir=x", f"confusion.{bad}"])
        with pytest.raises(SetupError, match=rf"^confusion=.*: {message}"):
            confusion_settings(cfg)


def odd_split_with_an_unreadable_image(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """7 of the run's 8 training images (an odd count) in a new folder, one of them corrupt."""
    cfg = compose_config("train", tiny_overrides(run_dir))
    root = ensure_synthetic_coco(**cfg.data.synthetic)  # the run's dataset, from the cache
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    images = data["images"][:7]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for entry in images:
        shutil.copy(root / "train2017" / entry["file_name"], image_dir / entry["file_name"])
    (image_dir / images[3]["file_name"]).write_bytes(b"\xff\xd8 not a jpeg")
    ids = {entry["id"] for entry in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    annotation_file = tmp_path / "odd.json"
    annotation_file.write_text(json.dumps(data))
    return image_dir, annotation_file


@pytest.mark.slow
def test_two_processes_give_the_statistics_and_results_of_one(trained_run, tmp_path):
    """DDP (gloo) evaluation of an odd-sized split with an unreadable image: the sampler
    repeats an image to even out the ranks, and the numbers and the results file must still
    be those of one process (with the same per-device batch, so the padding is the same)."""
    image_dir, annotation_file = odd_split_with_an_unreadable_image(trained_run, tmp_path)
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    common = [
        f"ckpt_path={checkpoint}",
        f"data.val_images={image_dir}",
        f"data.val_annotations={annotation_file}",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
    ]
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the DDP processes: float sums depend on the thread count
    try:
        evaluate(compose_config("eval", [*common, "data.val_batch_size=1", f"run_dir={single}"]))
    finally:
        torch.set_num_threads(threads)

    double = tmp_path / "double"
    command = [sys.executable, str(ROOT / "eval.py"), *common, "data.val_batch_size=2",
               "trainer.devices=2", "trainer.strategy=ddp", f"run_dir={double}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # two processes evaluated
    # each process set malloc to reuse freed memory (the callback's setup runs in both)
    assert (result.stdout + result.stderr).count("malloc keeps freed memory for reuse") == 2

    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    assert one["num_images"] == two["num_images"] == 7
    assert one["skipped_images"] == two["skipped_images"] == 1
    for key in COCO_METRIC_KEYS:
        assert one[key] == two[key], key
    assert one["map"] > 0  # the model found something: equal zeros would prove nothing
    predictions_one = json.loads((single / "predictions.json").read_text())
    predictions_two = json.loads((double / "predictions.json").read_text())
    assert predictions_one == predictions_two
    assert len({p["image_id"] for p in predictions_two}) == 6  # 7 images, one unreadable
    # and pycocotools agrees on the written file (the unreadable image's objects missed)
    reference = coco_eval_file(annotation_file, double / "predictions.json")
    assert max(abs(two[k] - r) for k, r in zip(COCO_METRIC_KEYS, reference)) <= 1e-6
    # the confusion matrix too: the repeated image counted once, the unreadable one's
    # objects missed
    matrix_one = json.loads((single / "confusion_matrix.json").read_text())
    matrix_two = json.loads((double / "confusion_matrix.json").read_text())
    assert matrix_one == matrix_two and matrix_two["num_images"] == 7
    all_images = {image["id"] for image in json.loads(annotation_file.read_text())["images"]}
    objects, kept = confusion_totals(annotation_file, predictions_two, all_images, 0.5)
    counts = np.array(matrix_two["counts"])
    assert counts[:-1].sum(1).tolist() == objects and counts[:, :-1].sum(0).tolist() == kept


def test_eval_of_a_missing_or_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    """What entry points print as ``error: ...`` without a traceback, naming the key."""
    from detr_lightning.utils.errors import SetupError

    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    for key, path in (("ckpt_path", tmp_path / "nope.ckpt"), ("pretrained", not_a_checkpoint)):
        cfg = compose_config("eval", [f"run_dir={tmp_path / 'run'}", f"{key}={path}"])
        with pytest.raises(SetupError, match=rf"^{key}={path}: "):
            evaluate(cfg)
