"""Batches grouped by output size (data.group_by_aspect_ratio): exact sizes, same samples,
less padding, reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lightning.data.coco import CocoDetection
from detr_lightning.data.presets import make_train_transforms
from detr_lightning.data.sampler import EpochSeededSampler, sample_seed
from detr_lightning.lightning import CocoDataModule
from helpers.data import make_tiny_synthetic

AUGMENTATION = {
    "scales": [48, 56, 64, 72],
    "max_size": 96,
    "crop_resize": [40, 56],
    "crop_min": 24,
    "crop_max": 56,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    root = make_tiny_synthetic(tmp_path_factory.mktemp("coco"), num_train=40, max_objects=2)
    return CocoDetection(
        root / "train2017",
        root / "annotations/instances_train2017.json",
        transforms=make_train_transforms(**AUGMENTATION),
    )


def test_output_size_predicts_the_augmented_size(dataset: CocoDetection) -> None:
    for index in range(len(dataset)):
        for epoch in range(3):
            key = (index, sample_seed(7, epoch, index))
            image, target = dataset[key]
            assert dataset.output_size(key) == tuple(image.shape[-2:])
            assert target["size"].tolist() == list(image.shape[-2:])


def padded_fraction(batches: list[list[tuple[int, int]]], dataset: CocoDetection) -> float:
    real = padded = 0
    for batch in batches:
        sizes = [dataset.output_size(key) for key in batch]
        real += sum(h * w for h, w in sizes)
        padded += len(sizes) * max(h for h, _ in sizes) * max(w for _, w in sizes)
    return 1 - real / padded


@pytest.mark.parametrize("world_size", [1, 3])
def test_grouping_reorders_the_same_samples_into_tighter_batches(
    dataset: CocoDetection, world_size: int
) -> None:
    batch = 4
    for rank in range(world_size):
        common = {"num_replicas": world_size, "rank": rank, "seed": 5}
        plain = EpochSeededSampler(dataset, **common)
        grouped = EpochSeededSampler(
            dataset,
            **common,
            group_batch_size=batch,
            size_of=lambda i, s: dataset.output_size((i, s)),
        )
        for epoch in range(2):
            plain.set_epoch(epoch)
            grouped.set_epoch(epoch)
            keys, grouped_keys = list(plain), list(grouped)
            # the same (index, seed) pairs, i.e. the same samples with the same augmentation
            assert sorted(grouped_keys) == sorted(keys)
            assert len(grouped) == len(plain) == len(keys)
            assert list(grouped) == grouped_keys  # a function of (seed, epoch) only
            cut = lambda ks: [ks[k : k + batch] for k in range(0, len(ks), batch)]
            assert padded_fraction(cut(grouped_keys), dataset) < padded_fraction(cut(keys), dataset)
            if world_size == 1:  # 40 images: every batch full
                assert [len(b) for b in cut(grouped_keys)] == [batch] * 10


def test_short_batch_stays_last(dataset: CocoDetection) -> None:
    sampler = EpochSeededSampler(
        dataset, seed=1, group_batch_size=6, group_window=2,
        size_of=lambda i, s: dataset.output_size((i, s)),
    )  # fmt: skip
    keys = list(sampler)
    batches = [keys[k : k + 6] for k in range(0, len(keys), 6)]
    assert [len(b) for b in batches] == [6] * 6 + [4]


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped"])
@pytest.mark.parametrize(("world_size", "rank"), [(1, 0), (3, 0), (3, 2)])
def test_an_epoch_resumed_after_trained_samples_is_the_rest_of_that_epoch(
    dataset: CocoDetection, grouped: bool, world_size: int, rank: int
) -> None:
    """``trained_source`` (a run resumed mid-epoch) leaves out exactly the first samples of
    the epoch's order; the grouped order computes no size in the windows it passes over."""
    batch, window = 3, 2  # windows of 6 samples
    calls: list[tuple[int, int]] = []

    def size_of(index: int, seed: int) -> tuple[int, int]:
        calls.append((index, seed))
        return dataset.output_size((index, seed))

    def sampler(trained: int) -> EpochSeededSampler:
        return EpochSeededSampler(
            dataset, num_replicas=world_size, rank=rank, seed=3,
            epoch_source=lambda: 2, trained_source=lambda: trained,
            group_batch_size=batch if grouped else None,
            size_of=size_of if grouped else None, group_window=window,
        )  # fmt: skip

    whole = list(sampler(0))
    assert len(whole) == len(sampler(0)) == -(-40 // world_size)
    for trained in range(0, len(whole) + 1, batch):
        calls.clear()
        rest = sampler(trained)
        assert list(rest) == whole[trained:], trained
        assert len(rest) == len(whole)  # Lightning counts the trained batches as done
        if grouped:  # sizes only for the windows from the first sample on
            first_window = trained // (batch * window) * batch * window
            assert len(calls) == len(whole) - first_window, trained


def test_grouping_needs_a_size_function(dataset: CocoDetection) -> None:
    with pytest.raises(ValueError, match="size_of"):
        EpochSeededSampler(dataset, group_batch_size=4)


def test_datamodule_groups_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    root = make_tiny_synthetic(tmp_path, num_train=16)
    settings = {"root": root, "batch_size": 4, "num_workers": 0, **AUGMENTATION}
    grouped = CocoDataModule(**settings)
    grouped.setup("fit")
    assert grouped.train_dataloader().sampler.group_batch_size == 4
    plain = CocoDataModule(**settings, group_by_aspect_ratio=False)
    plain.setup("fit")
    assert plain.train_dataloader().sampler.group_batch_size is None
    images = [batch[0] for batch in grouped.train_dataloader()]
    assert sum(len(b) for b in images) == 16
    assert all(torch.isfinite(b).all() for b in images)


def test_small_training_sizes_decode_jpegs_at_a_reduced_scale(tmp_path: Path) -> None:
    """Training at short sides <= 1/2 of the files decodes at 1/2 scale: same output size as
    predicted, boxes scaled to the decoded image, orig_size still the file's."""
    from helpers.data import write_coco

    images = [{"id": 1, "width": 321, "height": 250}, {"id": 2, "width": 200, "height": 401}]
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [100.0, 50.0, 120.0, 100.0]},
        {"image_id": 2, "category_id": 1, "bbox": [20.0, 300.0, 100.0, 80.0]},
    ]
    image_dir, annotation_file = write_coco(
        tmp_path, images, annotations, [{"id": 1, "name": "a"}], split="train"
    )
    augmentation = make_train_transforms(scales=[100, 110], max_size=400, crop=False,
                                         flip_probability=0.0)  # fmt: skip
    assert augmentation.source_short_side == 110
    reduced = CocoDetection(image_dir, annotation_file, transforms=augmentation)
    full = CocoDetection(image_dir, annotation_file, transforms=augmentation)
    full.transforms = None  # no source_short_side: full-size decode, uint8 -> float only
    for index, entry in enumerate(images):
        key = (index, 11 + index)
        image, target = reduced[key]
        assert reduced.output_size(key) == tuple(image.shape[-2:])
        assert target["orig_size"].tolist() == [entry["height"], entry["width"]]
        _, full_target = full[index]
        # normalized boxes agree with the full-size decode up to the 1/2-scale rounding
        torch.testing.assert_close(target["boxes"], full_target["boxes"], atol=4e-3, rtol=0)
