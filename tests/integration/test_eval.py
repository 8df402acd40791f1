"""detr-eval (eval.py) and the evaluation of a training run: artifacts, the repeated
validation, two processes giving the results of one, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_lightning.cli.eval import evaluate
from detr_lightning.cli.train import train
from detr_lightning.data.synthetic import ensure_synthetic_coco
from detr_lightning.evaluation.evaluator import COCO_METRIC_KEYS, coco_eval_file
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


def test_eval_of_a_missing_or_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    """What entry points print as ``error: ...`` without a traceback, naming the key."""
    from detr_lightning.utils.errors import SetupError

    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    for key, path in (("ckpt_path", tmp_path / "nope.ckpt"), ("pretrained", not_a_checkpoint)):
        cfg = compose_config("eval", [f"run_dir={tmp_path / 'run'}", f"{key}={path}"])
        with pytest.raises(SetupError, match=rf"^{key}={path}: "):
            evaluate(cfg)
