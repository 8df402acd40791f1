"""Training pipeline: overfitting, resume, metrics.json, evaluation against pycocotools."""

from __future__ import annotations

import json
import logging

import pytest
import pytorch_lightning as pl
import torch
from torchvision.ops import box_iou

import detr_lightning as dl
from detr_lightning.cli.resume import resume_checkpoint
from detr_lightning.cli.train import train
from detr_lightning.lightning import CocoDataModule
from detr_lightning.ops.boxes import box_cxcywh_to_xyxy
from detr_lightning.utils.errors import SetupError
from helpers.models import tiny_spec
from helpers.pipeline import RecordBatches, compose_config, tiny_overrides


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
        model=tiny_spec(
            norm="group",
            trainable_layers=5,
            num_classes=datamodule.num_classes,
            num_queries=6,
            hidden_dim=64,
            dim_feedforward=128,
            dropout=0.0,
        ),
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


def test_resume_gives_identical_next_steps(tmp_path, monkeypatch):
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
    straight = RecordBatches()
    train(compose_config("train", tiny_overrides(tmp_path / "straight", *common)), [straight])

    first = RecordBatches()
    cfg = compose_config(
        "train", tiny_overrides(tmp_path / "first", *common, "trainer.max_epochs=1")
    )
    train(cfg, [first])
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    resumed = RecordBatches()
    cfg = compose_config(
        "train", tiny_overrides(tmp_path / "resumed", *common, f"ckpt_path={checkpoint}")
    )
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(str(a[0])) or load(*a, **k))
    train(cfg, [resumed])
    monkeypatch.undo()
    assert reads.count(str(checkpoint)) == 1  # checked and resumed from one read

    steps_per_epoch = len(first.losses)
    assert steps_per_epoch == 2 and len(straight.losses) == 2 * steps_per_epoch
    assert first.losses == straight.losses[:steps_per_epoch]
    assert resumed.losses == straight.losses[steps_per_epoch:]
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 2 * steps_per_epoch


@pytest.mark.parametrize(
    ("grouped", "workers"), [(False, 0), (True, 0), (False, 1)], ids=["plain", "grouped", "worker"]
)
def test_resume_mid_epoch_continues_the_epoch_batch_for_batch(
    tmp_path, grouped, workers, caplog, recwarn
):
    """A checkpoint written in the middle of an epoch resumes with the next batch of that
    epoch: the same images, augmentations and losses as the uninterrupted run, and no image of
    the epoch trained twice. With a worker process too, whose iterator draws its first indices
    as soon as it exists (Lightning makes it before it restores the loop state)."""
    common = [
        "trainer.max_epochs=2",
        "data.synthetic.num_train=16",  # 4 steps per epoch
        f"data.group_by_aspect_ratio={str(grouped).lower()}",
        f"data.num_workers={workers}",
        "schedule=cosine",
        "schedule.warmup_steps=2",
        "data.crop=true",
    ]
    middle = tmp_path / "step6.ckpt"  # epoch 1, after 2 of its 4 batches
    straight = RecordBatches(save_at=6, path=middle)
    train(compose_config("train", tiny_overrides(tmp_path / "straight", *common)), [straight])
    assert len(straight.steps) == 8 and middle.is_file()
    state = torch.load(middle, weights_only=True)
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "trained_samples": 8}]

    resumed = RecordBatches()
    with caplog.at_level(logging.WARNING):
        cfg = compose_config(
            "train", tiny_overrides(tmp_path / "resumed", *common, f"ckpt_path={middle}")
        )
        train(cfg, [resumed])
    assert resumed.steps == straight.steps[6:]
    epoch_1 = [i for _, ids in straight.steps[4:] for i in ids]
    assert sorted(epoch_1) == sorted(i for _, ids in straight.steps[:4] for i in ids)
    assert len(set(epoch_1)) == 16  # every image once: the resumed half is the other half
    assert "not resumable" not in caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "training-order settings" not in caplog.text
    assert state["CocoDataModule"]["mid_epoch"] is True
    if not grouped and not workers:  # resumed with another order: said, not silent
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            cfg = compose_config("train", tiny_overrides(
                tmp_path / "regrouped", *common, "data.group_by_aspect_ratio=true",
                f"ckpt_path={middle}"))  # fmt: skip
            train(cfg, [])
        assert "group_by_aspect_ratio False -> True" in caplog.text


def test_overfit_batches_trains_the_same_batches_every_epoch(tmp_path):
    """``trainer.overfit_batches`` (debug=overfit) swaps in Lightning's sequential sampler;
    the resumable training loader takes it."""
    batches = RecordBatches()
    overrides = ["trainer.overfit_batches=1", "trainer.max_epochs=3", "trainer.limit_val_batches=0"]
    train(compose_config("train", tiny_overrides(tmp_path, *overrides)), [batches])
    assert len(batches.steps) == 3
    assert [ids for _, ids in batches.steps] == [[1, 2, 3, 4]] * 3


def test_accumulated_batches_make_up_the_global_batch(tmp_path):
    """data.batch_size is the images of one optimizer step also when gradients accumulate:
    8 images, batch 4, two accumulated batches of 2 per step, so 2 steps per epoch."""
    batches = RecordBatches()
    overrides = ["trainer.accumulate_grad_batches=2", "trainer.max_epochs=1", "callbacks=default",
                 "callbacks.progress_bar=null", "callbacks.metrics_history.plot=false"]  # fmt: skip
    train(compose_config("train", tiny_overrides(tmp_path, *overrides)), [batches])
    assert [len(ids) for _, ids in batches.steps] == [2, 2, 2, 2]
    assert sorted(i for _, ids in batches.steps for i in ids) == list(range(1, 9))
    assert batches.global_steps == [0, 1, 1, 2]  # an optimizer step every second batch
    # validation batched as one forward pass of training, and the checkpoint says so
    data = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)[
        "hyper_parameters"
    ]["data"]
    assert (data["val_batch_size"], data["train_per_device_batch_size"]) == (2, 2)


def test_resume_auto_starts_then_continues_the_run_directory(tmp_path, monkeypatch):
    """A requeued job reruns its own command in its own run directory: the first start finds
    no checkpoint and trains from the beginning, the rerun continues from last.ckpt."""
    run_dir = tmp_path / "run"
    common = ["callbacks=default", "callbacks.progress_bar=null",
              "callbacks.metrics_history.plot=false", "resume=auto"]  # fmt: skip
    first_cfg = compose_config("train", tiny_overrides(run_dir, *common, "trainer.max_epochs=1"))
    assert resume_checkpoint(first_cfg) is None
    train(first_cfg)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(checkpoint, weights_only=True)
    second_cfg = compose_config("train", tiny_overrides(run_dir, *common, "trainer.max_epochs=2"))
    assert resume_checkpoint(second_cfg) == str(checkpoint)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(str(a[0])) or load(*a, **k))
    train(second_cfg)
    monkeypatch.undo()
    # found, checked and resumed from one read (a DETR-R50 training state is ~500 MB)
    assert reads.count(str(checkpoint)) == 1, reads
    second = torch.load(checkpoint, weights_only=True)
    assert second["epoch"] == 1 and second["global_step"] == 2 * first["global_step"]
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [0, 1]  # one epoch per start


def test_dataset_classes_unknown_to_the_model(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path, "model.num_classes=2"))
    with pytest.raises(ValueError, match=r"3 classes(.|\n)*model.num_classes=3"):
        train(cfg)


def test_missing_annotation_file_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose_config("train", tiny_overrides(tmp_path, f"data.root={tmp_path / 'empty'}"))
    # a setup error (one "error:" line from the entry point) naming the setting and the file
    with pytest.raises(
        SetupError, match=r"^data\.root=.*empty: annotation file .*instances_val2017\.json"
    ):
        train(cfg)


def test_pretrained_with_other_classes_reinitializes_head(tmp_path):
    """pretrained=... with a different class count: all but the class head is loaded."""
    source = compose_config("train", tiny_overrides(tmp_path / "a", "model.num_classes=7"))
    from detr_lightning.cli.train import build_module

    datamodule = CocoDataModule(root=None, synthetic=dict(source.data.synthetic), num_workers=0)
    original = build_module(source, datamodule)
    exported = dl.save_pretrained(original, tmp_path / "export")
    cfg = compose_config("train", tiny_overrides(tmp_path / "b", f"pretrained={exported}"))
    module = build_module(cfg, datamodule)
    assert module.model.num_classes == datamodule.num_classes == 3
    ours, theirs = module.model.state_dict(), original.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("class_embed"))


def test_pretrained_with_other_labels_of_the_same_count_reinitializes_head(tmp_path, caplog):
    """Same class count, other categories (ids or names): the head is re-initialized too."""
    from detr_lightning.cli.train import build_module

    cfg = compose_config("train", tiny_overrides(tmp_path / "a"))
    datamodule = CocoDataModule(root=None, synthetic=dict(cfg.data.synthetic), num_workers=0)
    original = build_module(cfg, datamodule)
    renamed = dict(original.label_map, names=["x", "y", "z"])
    original.hparams["label_map"] = renamed
    exported = dl.save_pretrained(original, tmp_path / "export")
    cfg = compose_config("train", tiny_overrides(tmp_path / "b", f"pretrained={exported}"))
    with caplog.at_level("INFO"):
        module = build_module(cfg, datamodule)
    assert "re-initializing the class head" in caplog.text
    ours, theirs = module.model.state_dict(), original.model.state_dict()
    assert not torch.equal(ours["class_embed.weight"], theirs["class_embed.weight"])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("class_embed"))
    # the same labels: the head is kept
    original.hparams["label_map"] = module.label_map
    exported = dl.save_pretrained(original, tmp_path / "export-same")
    cfg = compose_config("train", tiny_overrides(tmp_path / "c", f"pretrained={exported}"))
    kept = build_module(cfg, datamodule)
    assert torch.equal(kept.model.class_embed.weight, original.model.class_embed.weight)


def test_pretrained_of_another_architecture_names_each_override(tmp_path, caplog):
    """A checkpoint whose weights need another backbone or transformer than the config's is
    refused before any model is built, naming each override; an official DC5 file name on a
    config without DC5 (the weights fit both) is a warning."""
    from detr_lightning.cli.train import build_module
    from detr_lightning.utils.errors import SetupError

    source = compose_config("train", tiny_overrides(tmp_path / "a", "model.enc_layers=2"))
    datamodule = CocoDataModule(root=None, synthetic=dict(source.data.synthetic), num_workers=0)
    original = build_module(source, datamodule)
    exported = dl.save_pretrained(original, tmp_path / "export")
    other = ["backbone=resnet34", "model.enc_layers=1", f"pretrained={exported}"]
    cfg = compose_config("train", tiny_overrides(tmp_path / "b", *other))
    with pytest.raises(SetupError) as info:
        build_module(cfg, datamodule)
    message = str(info.value)
    assert "backbone: checkpoint resnet18, config resnet34: set backbone=resnet18" in message
    assert "enc_layers: checkpoint 2, config 1: set model.enc_layers=2" in message
    assert "dec_layers" not in message and "hidden_dim" not in message

    # the official release's name for the DC5 model, on a config without DC5
    state = {
        key.replace("backbone.", "backbone.0.", 1) if key.startswith("backbone.") else key: value
        for key, value in original.model.state_dict().items()
    }
    official = tmp_path / "detr-r50-dc5-f0fb7ef5.pth"
    torch.save({"model": state}, official)
    cfg = compose_config("train", tiny_overrides(tmp_path / "c", "model.enc_layers=2",
                                                 f"pretrained={official}"))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        module = build_module(cfg, datamodule)
    assert "is the official DC5 checkpoint, but the config does not dilate" in caplog.text
    assert "use model=detr_r50_dc5" in caplog.text
    assert torch.equal(module.model.query_embed.weight, original.model.query_embed.weight)

    # a file that does not exist, and one that is no checkpoint: one line each, no traceback
    for bad in (tmp_path / "nope.pth", tmp_path / "a" / "config.yaml"):
        cfg = compose_config("train", tiny_overrides(tmp_path / "d", f"pretrained={bad}"))
        with pytest.raises(SetupError, match=rf"pretrained={bad}: "):
            build_module(cfg, datamodule)


def test_resume_with_another_model_names_the_keys(tmp_path):
    first = tiny_overrides(tmp_path / "first", "trainer.max_epochs=1", "callbacks=default",
                           "callbacks.progress_bar=null")  # fmt: skip
    train(compose_config("train", first))
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    other_model = ["model.num_queries=9", "model.hidden_dim=48", f"ckpt_path={checkpoint}"]
    cfg = compose_config("train", tiny_overrides(tmp_path / "second", *other_model))
    with pytest.raises(ValueError, match=r"cannot resume .*hidden_dim: checkpoint 32, config 48.*"
                                         r"num_queries: checkpoint 8, config 9"):  # fmt: skip
        train(cfg)


def test_predict_returns_original_coordinates_and_category_ids(tmp_path):
    cfg = compose_config("train", tiny_overrides(tmp_path))
    from detr_lightning.cli.train import build_module, instantiate_data

    datamodule = instantiate_data(cfg.data)
    module = build_module(cfg, datamodule).eval()
    module.postprocess.top_k = 3
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    batches = trainer.predict(module, datamodule=datamodule)
    results = [item for batch in batches for item in batch]
    assert [r["image_id"] for r in results] == datamodule.val_dataset.image_ids
    coco = json.loads(datamodule.val_annotation_file.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {entry["id"]: entry for entry in coco["images"]}
    for result in results:
        info = images[result["image_id"]]
        boxes = result["boxes"]
        assert len(boxes) == 3
        # xyxy in the original image's pixels (sigmoid boxes stay inside it)
        assert (boxes[:, 0::2] >= -1e-3).all() and (boxes[:, 0::2] <= info["width"] + 1e-3).all()
        assert (boxes[:, 1::2] >= -1e-3).all() and (boxes[:, 1::2] <= info["height"] + 1e-3).all()
        assert set(result["category_ids"].tolist()) <= set(names)
        assert result["names"] == [names[c] for c in result["category_ids"].tolist()]


def test_console_has_no_setup_warnings(tmp_path, caplog):
    """Default workers and pin memory on this machine, a validation epoch and its metrics:
    no worker-count, pin-memory or sync_dist warnings, and no Lightning product tips."""
    import warnings

    cfg = compose_config(
        "train",
        tiny_overrides(
            tmp_path, "trainer.max_epochs=1", "data.num_workers=null", "data.pin_memory=null"
        ),
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        train(cfg)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    noises = ("num_workers", "worker", "pin_memory", "sync_dist", "Tip:", "LeafSpec",
              "infer the `batch_size`")  # fmt: skip
    # the COCO backend's own table: the final validation prints ours
    assert not [r for r in caplog.records if r.name.startswith("faster_coco_eval")]
    for noise in noises:
        assert not [m for m in messages if noise in m], (noise, messages)
