"""Batching (collate) and the CocoDataModule: batch sizes, loaders, label map."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from detr_lightning.data import collate_detection
from detr_lightning.lightning import CocoDataModule
from detr_lightning.lightning.datamodule import default_num_workers
from helpers.data import TINY_SYNTHETIC, make_tiny_synthetic

SMALL_AUGMENT = {
    "scales": [48, 64],
    "max_size": 100,
    "crop_resize": [48, 64],
    "crop_min": 32,
    "crop_max": 56,
    "val_size": 64,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_synthetic(tmp_path_factory.mktemp("coco"))


def sample(height: int, width: int, num_boxes: int = 1) -> tuple[Tensor, dict]:
    return torch.rand(3, height, width), {
        "boxes": torch.rand(num_boxes, 4),
        "labels": torch.zeros(num_boxes, dtype=torch.int64),
    }


# ------------------------------------------------------------------------------------ collate


def test_collate_pads_to_largest_and_masks_padding() -> None:
    samples = [sample(5, 7), sample(6, 3, num_boxes=0), sample(2, 2, num_boxes=3)]
    images, padding_mask, targets = collate_detection(samples)
    assert images.shape == (3, 3, 6, 7) and padding_mask.shape == (3, 6, 7)
    assert padding_mask.dtype == torch.bool
    for i, (image, target) in enumerate(samples):
        h, w = image.shape[1:]
        assert torch.equal(images[i, :, :h, :w], image)
        expected = torch.ones(6, 7, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(padding_mask[i], expected)
        assert images[i][:, padding_mask[i]].abs().sum() == 0
        assert targets[i] is target


# --------------------------------------------------------------------------------- datamodule


def test_label_map_available_after_construction(root: Path) -> None:
    dm = CocoDataModule(root=str(root), **SMALL_AUGMENT)
    assert dm.label_map.category_ids == [1, 2, 5, 6, 9]
    assert dm.num_classes == 5
    assert dm.train_dataset is None  # nothing heavy yet
    dm = CocoDataModule(root=str(root), label_mapping="category_id", **SMALL_AUGMENT)
    assert dm.num_classes == 10  # max category id 9, plus one


@pytest.mark.parametrize(
    ("world_size", "batch_size", "val_batch_size", "expected"),
    [(1, 4, None, (4, 4)), (2, 4, None, (2, 2)), (4, 8, 4, (2, 1))],
)
def test_global_batch_is_split_across_devices(
    root: Path, world_size: int, batch_size: int, val_batch_size: int | None, expected: tuple
) -> None:
    dm = CocoDataModule(
        root=root, batch_size=batch_size, val_batch_size=val_batch_size, **SMALL_AUGMENT
    )
    dm.trainer = SimpleNamespace(world_size=world_size)
    dm.setup("validate")
    assert (dm.per_device_batch_size, dm.per_device_val_batch_size) == expected
    assert dm.val_dataloader().batch_size == expected[1]


def test_global_batch_counts_the_accumulated_batches(root: Path) -> None:
    """With gradient accumulation a global batch is still the images of one optimizer step:
    each device's forward pass takes its share of one of the accumulated batches."""
    dm = CocoDataModule(root=root, batch_size=16, val_batch_size=8, **SMALL_AUGMENT)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=4)
    dm.setup("fit")
    assert (dm.per_device_batch_size, dm.per_device_val_batch_size) == (2, 4)
    assert dm.train_dataloader().batch_size == 2
    # without a val_batch_size, validation batches are those of one forward pass of training
    dm = CocoDataModule(root=root, batch_size=16, **SMALL_AUGMENT)
    dm.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=4)
    dm.setup("validate")
    assert (dm.val_batch_size, dm.per_device_val_batch_size) == (4, 2)
    dm = CocoDataModule(root=root, batch_size=12, **SMALL_AUGMENT)
    dm.trainer = SimpleNamespace(world_size=2, accumulate_grad_batches=4)
    with pytest.raises(ValueError, match=r"batch_size=12 .*accumulate_grad_batches 4 = 8"):
        dm.setup("fit")


def test_resume_warns_of_another_order_only_within_an_epoch(root: Path, caplog) -> None:
    dm = CocoDataModule(root=root, batch_size=4, **SMALL_AUGMENT)
    order = dm._training_order()
    other = {**order, "seed": order["seed"] + 1, "world_size": 2}
    with caplog.at_level(logging.WARNING):
        dm.load_state_dict({"training_order": order, "mid_epoch": True})
        dm.load_state_dict({"training_order": other, "mid_epoch": False})  # a new epoch
    assert "training-order" not in caplog.text
    with caplog.at_level(logging.WARNING):
        dm.load_state_dict({"training_order": other, "mid_epoch": True})
    assert "world_size 2 -> 1" in caplog.text and f"seed {order['seed'] + 1} -> " in caplog.text


def test_indivisible_global_batch_is_an_error(root: Path) -> None:
    dm = CocoDataModule(root=root, batch_size=6, **SMALL_AUGMENT)
    dm.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match=r"batch_size=6 .* divisible by the world size 4"):
        dm.setup("fit")
    dm = CocoDataModule(root=root, batch_size=4, val_batch_size=2, **SMALL_AUGMENT)
    dm.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError, match=r"val_batch_size=2"):
        dm.setup("fit")


def test_dataloaders_yield_images_mask_targets(root: Path) -> None:
    dm = CocoDataModule(root=root, batch_size=4, val_batch_size=3, **SMALL_AUGMENT)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == TINY_SYNTHETIC["num_train"]
    num_images = 0
    for images, padding_mask, targets in loader:
        batch = images.shape[0]
        assert images.dtype == torch.float32 and images.shape[1] == 3
        assert padding_mask.shape == (batch, *images.shape[2:]) and padding_mask.dtype == torch.bool
        assert len(targets) == batch
        for i, target in enumerate(targets):
            h, w = target["size"].tolist()
            assert not padding_mask[i, :h, :w].any() and padding_mask[i].sum() == (
                padding_mask.shape[1] * padding_mask.shape[2] - h * w
            )
            assert set(target) == {"boxes", "labels", "image_id", "orig_size", "size",
                                   "stand_in_for"}  # fmt: skip
        num_images += batch
    assert num_images == TINY_SYNTHETIC["num_train"]  # drop_last=False

    images, _, targets = next(iter(dm.val_dataloader()))
    assert images.shape[0] == 3
    assert all(min(t["size"].tolist()) == 64 or max(t["size"].tolist()) == 100 for t in targets)
    for name in ("test_dataloader", "predict_dataloader"):
        assert getattr(dm, name)().dataset is dm.val_dataset
    listed = json.loads(dm.val_annotation_file.read_text())["images"]
    assert sorted(e["id"] for e in listed) == sorted(dm.val_dataset.image_ids)
    assert dm.val_annotation_file == root / "annotations" / "instances_val2017.json"


def test_synthetic_default_root_and_absolute_paths(tmp_path: Path) -> None:
    params = {**TINY_SYNTHETIC, "num_train": 3, "num_val": 2, "cache_dir": str(tmp_path)}
    dm = CocoDataModule(root=None, synthetic=params, **SMALL_AUGMENT)
    assert dm.root.parent == tmp_path and dm.num_classes == TINY_SYNTHETIC["num_categories"]
    (tmp_path / "elsewhere").mkdir()
    again = CocoDataModule(
        root=tmp_path / "elsewhere",
        train_images=str(dm.root / "train2017"),
        val_images=str(dm.root / "val2017"),
        train_annotations=str(dm.root / "annotations/instances_train2017.json"),
        val_annotations=str(dm.root / "annotations/instances_val2017.json"),
        **SMALL_AUGMENT,
    )
    again.setup("fit")
    assert len(again.train_dataset) == 3 and len(again.val_dataset) == 2


def test_missing_val_annotations_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"instances_val2017.json does not exist"):
        CocoDataModule(root=tmp_path, **SMALL_AUGMENT)


def test_train_and_val_categories_must_match(tmp_path: Path) -> None:
    root = make_tiny_synthetic(tmp_path, num_train=2, num_val=2)
    train_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(train_file.read_text())
    data["categories"] = [*data["categories"][:-1], {"id": 99, "name": "other"}]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 9]
    train_file.write_text(json.dumps(data))
    dm = CocoDataModule(root=root, **SMALL_AUGMENT)
    with pytest.raises(ValueError, match=r"instances_train2017.json differ from those of"):
        dm.setup("fit")


class _CountingModule(pl.LightningModule):
    """Consumes (images, padding_mask, targets) batches; records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[int] = []

    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        images, padding_mask, targets = batch
        assert padding_mask.shape[0] == len(targets) == images.shape[0]
        self.seen.append(images.shape[0])
        return self.weight * images.mean() + self.weight**2

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        assert len(batch[2]) == batch[0].shape[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_under_a_trainer(root: Path) -> None:
    dm = CocoDataModule(root=root, batch_size=4, **SMALL_AUGMENT)
    module = _CountingModule()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert module.seen == [4, 4, 4]


def test_use_label_map_from_a_checkpoint(root: Path) -> None:
    dm = CocoDataModule(root=root, **SMALL_AUGMENT)
    stored = {
        "category_ids": [-1, 1, 2, -1, -1, 5, 6, -1, -1, 9],
        "names": ["N/A", "a", "b", "N/A", "N/A", "c", "d", "N/A", "N/A", "e"],
    }
    dm.use_label_map(stored)
    assert dm.num_classes == 10
    dm.setup("validate")
    labels = torch.cat([dm.val_dataset[i][1]["labels"] for i in range(len(dm.val_dataset))])
    assert set(labels.tolist()) <= {1, 2, 5, 6, 9}
    with pytest.raises(ValueError, match=r"category ids \[6, 9\] that the given label map"):
        dm.use_label_map({"category_ids": [1, 2, 5], "names": ["a", "b", "c"]})


def test_the_data_s_own_label_map_keeps_the_built_datasets(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Evaluation hands the checkpoint's map to the data module after its setup: when it is
    the data's own, the split is neither built nor summarized a second time."""
    dm = CocoDataModule(root=root, **SMALL_AUGMENT)
    with caplog.at_level(logging.INFO, logger="detr_lightning.lightning.datamodule"):
        dm.setup("validate")
        built = dm.val_dataset
        dm.use_label_map(dm.label_map.to_dict())
        dm.setup("validate")
    assert dm.val_dataset is built
    assert sum(r.getMessage().startswith("val: ") for r in caplog.records) == 1


@pytest.mark.parametrize(
    "cores, devices, expected",
    [(1, 1, 0), (2, 1, 0), (4, 2, 0), (3, 1, 2), (16, 1, 15), (16, 4, 3), (16, 8, 0)],
)
def test_default_num_workers_leaves_small_machines_to_the_training_process(
    cores: int, devices: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to 2 cores per device: no workers. Otherwise Lightning's cores / devices - 1."""
    import lightning_fabric.utilities.data as fabric_data

    monkeypatch.setattr(fabric_data, "_num_cpus_available", lambda: cores)
    assert default_num_workers(devices, cores=cores) == expected
