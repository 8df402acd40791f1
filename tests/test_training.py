"""Training pipeline: overfitting, resume, metrics.json, evaluation against pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torchvision.ops import box_iou

import detr_lightning as dl
from detr_lightning.data import CocoDataModule
from detr_lightning.eval import coco_eval_file, evaluate
from detr_lightning.module import COCO_METRIC_KEYS
from detr_lightning.ops.boxes import box_cxcywh_to_xyxy
from detr_lightning.train import train
from pipeline_fixtures import compose_config, tiny_overrides


def test_overfit_one_batch():
    """A tiny DETR memorizes one batch: the loss collapses and the boxes come back."""
    datamodule = CocoDataModule(
        root=None,
        synthetic={
            "num_train": 4,
            "num_val": 2,
            "min_size": 96,
            "max_size": 96,
            "num_categories": 3,
            "min_objects": 1,
            "max_objects": 2,
            "seed": 5,
            "empty_fraction": 0.0,
        },
        batch_size=2,
        num_workers=0,
        scales=[96],
        max_size=128,
        crop=False,
        val_size=96,
    )
    datamodule.setup("validate")
    images, mask, targets = next(iter(datamodule.val_dataloader()))
    module = dl.DETRModule(
        model={
            "backbone": "resnet18",
            "norm": "group",
            "trainable_layers": 5,
            "num_classes": datamodule.num_classes,
            "num_queries": 6,
            "hidden_dim": 64,
            "nheads": 4,
            "enc_layers": 1,
            "dec_layers": 2,
            "dim_feedforward": 128,
            "dropout": 0.0,
        },
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-4)
    losses = []
    for _ in range(150):
        out = module(images, mask)
        loss = module.criterion.weighted_total(module.criterion(out, targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.1)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])

    module.eval()
    with torch.no_grad():
        detections = module.postprocess(module(images, mask), [(96, 96)] * len(targets))
    for target, det in zip(targets, detections):
        gt = box_cxcywh_to_xyxy(target["boxes"]) * 96
        top = det["scores"].argsort(descending=True)[: len(gt)]
        iou = box_iou(det["boxes"][top], gt)
        # every ground-truth box is found by one of the top detections, with its label
        best_iou, best = iou.max(0)
        assert (best_iou > 0.7).all(), best_iou
        assert torch.equal(det["labels"][top][best], target["labels"])


class _StepLosses(pl.Callback):
    """Records the training loss of every optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_resume_gives_identical_next_steps(tmp_path):
    """Resuming from last.ckpt repeats the uninterrupted run's losses (dropout and augmentation
    included): weights, optimizer, scheduler, epoch, step and random state all come back."""
    common = [
        "trainer.max_epochs=2",
        "callbacks=default",
        "callbacks.progress_bar=null",
        "schedule=cosine",
        "schedule.warmup_steps=2",
        "data.crop=true",
    ]
    straight = _StepLosses()
    train(compose_config("train", tiny_overrides(tmp_path / "straight", *common)), [straight])

    first = _StepLosses()
    cfg = compose_config(
        "train", tiny_overrides(tmp_path / "first", *common, "trainer.max_epochs=1")
    )
    train(cfg, [first])
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    resumed = _StepLosses()
    cfg = compose_config(
        "train", tiny_overrides(tmp_path / "resumed", *common, f"ckpt_path={checkpoint}")
    )
    train(cfg, [resumed])

    steps_per_epoch = len(first.losses)
    assert steps_per_epoch == 2 and len(straight.losses) == 2 * steps_per_epoch
    assert first.losses == straight.losses[:steps_per_epoch]
    assert resumed.losses == straight.losses[steps_per_epoch:]
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 2 * steps_per_epoch


@pytest.mark.slow
def test_train_writes_run_artifacts_and_eval_matches_pycocotools(tmp_path):
    run_dir = tmp_path / "train"
    cfg = compose_config(
        "train",
        tiny_overrides(
            run_dir,
            "trainer.max_epochs=20",
            "trainer.check_val_every_n_epoch=10",
            "callbacks=default",
            "callbacks.progress_bar=null",
            "optimizer.lr=1e-3",
            "backbone.lr=1e-3",
            "model.dropout=0.0",
            "data.crop=false",
        ),
    )
    result = train(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(COCO_METRIC_KEYS) <= set(metrics)
    assert [entry["epoch"] for entry in metrics["history"]] == list(range(20))
    for entry in metrics["history"]:
        assert entry["train_loss"] > 0 and entry["train_seconds"] > 0
        assert entry["train_images_per_s"] > 0 and entry["peak_memory_mb"] > 0
        # validation ran after epochs 10 and 20 only
        assert (set(COCO_METRIC_KEYS) <= set(entry)) == (entry["epoch"] in (9, 19))
    assert metrics["map"] == metrics["history"][-1]["map"] == result["map"]
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best-") for p in (run_dir / "checkpoints").iterdir())

    # Evaluated on the images it was trained on, so that the metrics are far from zero and
    # the comparison with pycocotools is meaningful.
    eval_dir = tmp_path / "eval"
    eval_cfg = compose_config(
        "eval",
        [
            *(o for o in tiny_overrides(eval_dir) if o.startswith("data")),
            "trainer=cpu",
            "data.val_images=train2017",
            "data.val_annotations=annotations/instances_train2017.json",
            "trainer.enable_progress_bar=false",
            f"run_dir={eval_dir}",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        ],
    )
    evaluated = evaluate(eval_cfg)
    written = json.loads((eval_dir / "metrics.json").read_text())
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score"} == set(predictions[0])
    annotations = json.loads(Path(written["annotations"]).read_text())
    assert {p["category_id"] for p in predictions} <= {c["id"] for c in annotations["categories"]}
    reference = coco_eval_file(written["annotations"], eval_dir / "predictions.json")
    ours = [written[key] for key in COCO_METRIC_KEYS]
    # the issue asks for 1e-4; with COCOeval's thresholds the only difference is float32 rounding
    assert max(abs(a - b) for a, b in zip(ours, reference)) <= 1e-6, (ours, reference)
    # a comparison of zeros would prove nothing
    assert sum(value > 0 for value in reference) >= 3, reference
    assert evaluated["map"] == written["map"]


def test_dataset_classes_unknown_to_the_model(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path, "model.num_classes=2"))
    with pytest.raises(ValueError, match=r"3 classes(.|\n)*model.num_classes=3"):
        train(cfg)


def test_missing_dataset_names_the_file(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path, f"data.root={tmp_path / 'nowhere'}"))
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        train(cfg)


def test_pretrained_with_other_classes_reinitializes_head(tmp_path):
    """pretrained=... with a different class count: all but the class head is loaded."""
    source = compose_config("train", tiny_overrides(tmp_path / "a", "model.num_classes=7"))
    from detr_lightning.train import build_module

    datamodule = CocoDataModule(root=None, synthetic=dict(source.data.synthetic), num_workers=0)
    original = build_module(source, datamodule)
    exported = dl.export(original, tmp_path / "export")
    cfg = compose_config("train", tiny_overrides(tmp_path / "b", f"pretrained={exported}"))
    module = build_module(cfg, datamodule)
    assert module.model.num_classes == datamodule.num_classes == 3
    ours, theirs = module.model.state_dict(), original.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("class_embed"))


def test_predict_returns_original_coordinates_and_category_ids(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path))
    from detr_lightning.train import build_module, instantiate_data

    datamodule = instantiate_data(cfg.data)
    module = build_module(cfg, datamodule).eval()
    module.postprocess.top_k = 3
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    batches = trainer.predict(module, datamodule=datamodule)
    results = [item for batch in batches for item in batch]
    assert [r["image_id"] for r in results] == datamodule.val_dataset.image_ids
    coco = datamodule.val_coco
    category_ids = set(coco.getCatIds())
    for result in results:
        info = coco.loadImgs(result["image_id"])[0]
        boxes = result["boxes"]
        assert len(boxes) == 3
        # xyxy in the original image's pixels (sigmoid boxes stay inside it)
        assert (boxes[:, 0::2] >= -1e-3).all() and (boxes[:, 0::2] <= info["width"] + 1e-3).all()
        assert (boxes[:, 1::2] >= -1e-3).all() and (boxes[:, 1::2] <= info["height"] + 1e-3).all()
        assert set(result["category_ids"].tolist()) <= category_ids
        names = {c["id"]: c["name"] for c in coco.loadCats(list(category_ids))}
        assert result["names"] == [names[c] for c in result["category_ids"].tolist()]
