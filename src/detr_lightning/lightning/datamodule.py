"""LightningDataModule for COCO-format detection data (real COCO, custom, or synthetic).

Batch sizes are global: ``batch_size`` (and ``val_batch_size``) count images per optimizer step
across all devices and nodes, as in the DETR paper (64 = 16 GPUs x 4). ``setup()`` divides them
by ``trainer.world_size`` to get the per-device batch, and the training batch also by the
trainer's ``accumulate_grad_batches`` (each optimizer step then sums that many smaller
batches); it raises ``ValueError`` when a division is not exact, so changing the number of
GPUs or accumulating gradients never silently changes the recipe.

Only what a stage needs is built: evaluation never touches the training split or its
augmentation settings. :meth:`CocoDataModule.evaluation_settings` returns what a checkpoint
must remember to evaluate the model as it was validated (split, sizes, label mapping).

Each split it builds is summarized in one log line (a warning when it has problems, see
:mod:`detr_lightning.data.checks`); a validation split that COCO evaluation would fail on or
score wrongly (annotations without ``id``/``area``/``iscrowd``, repeated annotation ids) is a
``ValueError`` at setup rather than after the first training epoch.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.data import suggested_max_num_workers
from torch.utils.data import DataLoader

from ..data.annotations import category_names
from ..data.checks import ERROR, WARNING, SplitReport, split_report, summary_line
from ..data.coco import CocoDetection, load_coco_json
from ..data.collate import collate_detection
from ..data.labels import LabelMap
from ..data.paths import dataset_root, split_path
from ..data.presets import DEFAULT_SCALES, make_train_transforms, make_val_transforms
from ..data.sampler import EpochSeededSampler, ResumableDataLoader
from ..ops.padding import parse_pad_to
from . import compat

__all__ = ["CocoDataModule", "default_num_workers"]

log = logging.getLogger(__name__)


def _per_device(global_size: int, world_size: int, name: str, accumulate: int = 1) -> int:
    """Images per device and forward pass of a global batch of ``global_size`` per step."""
    if global_size <= 0:
        raise ValueError(f"{name} must be a positive global batch size, got {global_size}")
    parts = world_size * accumulate
    if global_size % parts:
        over = f"the world size {world_size} (devices x nodes)"
        if accumulate > 1:
            over = f"{over} x trainer.accumulate_grad_batches {accumulate} = {parts}"
        raise ValueError(
            f"{name}={global_size} is the global batch size (images per optimizer step) and "
            f"must be divisible by {over}; choose a multiple of {parts}"
        )
    return global_size // parts


# What a data-loader worker needs, imported once by the forkserver instead of by every worker.
WORKER_PRELOAD = ["torch", "torchvision", "detr_lightning.data.coco", "detr_lightning.data.presets"]


def default_num_workers(num_devices: int, cores: int | None = None) -> int:
    """Data-loader workers per device when ``num_workers`` is not set.

    With two cores or fewer per device, none: the batches load in the training process. A
    worker would share a core with the training threads, and each of their parallel ops waits
    for its slowest thread: on 2 cores, training steps took 12-15% longer with one worker than
    with loading in between the steps (the small benchmark config, ResNet-18 at 128-256 pixels).
    With more cores, Lightning's suggestion: cores per device - 1.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) // max(num_devices, 1) <= 2:
        return 0
    return suggested_max_num_workers(num_devices)


def _worker_context(method: str | None) -> Any:
    """The multiprocessing context for data-loader workers (None: the platform default).

    "forkserver" (the default) starts workers from a small server process that imported only
    :data:`WORKER_PRELOAD`: a forked worker would instead start as a copy of the training
    process (model, optimizer, Lightning, evaluation state), which its resident memory counts
    and which copy-on-write turns into real copies as reference counts change."""
    if method is None or method not in mp.get_all_start_methods():
        return None
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(WORKER_PRELOAD)
    return context


class CocoDataModule(pl.LightningDataModule):
    """COCO-layout train/val splits with the DETR augmentations.

    ``synthetic`` (a dict of :func:`~detr_lightning.data.synthetic.ensure_synthetic_coco`
    parameters) with ``root=None`` uses the synthetic shapes dataset, generated once into the
    cache. Image directories and annotation files are relative to ``root`` unless absolute.
    ``label_map`` and ``num_classes`` come from the validation annotations' categories and are
    available right after construction. ``num_workers=None`` takes what the machine has per
    device (:func:`default_num_workers`: none with up to 2 cores per device, else cores /
    devices - 1); ``pin_memory=None`` pins only when
    training on a GPU. Batches are ``(images [B,3,H,W], padding_mask [B,H,W] bool, targets)``
    from :func:`~detr_lightning.data.collate.collate_detection`.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike | None = None,
        train_images: str = "train2017",
        val_images: str = "val2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_annotations: str = "annotations/instances_val2017.json",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        worker_start: str | None = "forkserver",
        group_by_aspect_ratio: bool = True,
        pad_to: int | Sequence[Sequence[int]] | None = None,
        scales: Sequence[int] = DEFAULT_SCALES,
        max_size: int = 1333,
        crop: bool = True,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_min: int = 384,
        crop_max: int = 600,
        val_size: int = 800,
        label_mapping: str = "contiguous",
        strict: bool = False,
        synthetic: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.synthetic = dict(synthetic) if root is None and synthetic is not None else None
        self.root = dataset_root(root, synthetic)
        self.train_image_dir = split_path(self.root, train_images)
        self.val_image_dir = split_path(self.root, val_images)
        self.train_annotation_file = split_path(self.root, train_annotations)
        self.val_annotation_file = split_path(self.root, val_annotations)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size if val_batch_size is not None else batch_size)
        self._val_batch_follows_train = val_batch_size is None  # see setup()
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        if worker_start not in (None, "fork", "forkserver", "spawn"):
            raise ValueError(
                f"data.worker_start={worker_start!r}: choose forkserver, spawn, fork or null "
                "(the platform's default)"
            )
        self.worker_start = worker_start
        self.group_by_aspect_ratio = bool(group_by_aspect_ratio)
        self.pad_to = parse_pad_to(pad_to)
        # a function of the module's settings only: workers get it by pickling
        self.collate = functools.partial(collate_detection, pad_to=self.pad_to)
        self.label_mapping = label_mapping
        self.strict = strict
        self.seed = int(seed)
        self.val_size = int(val_size)
        self.max_size = int(max_size)
        self._train_augmentation = {
            "scales": list(scales),
            "max_size": self.max_size,
            "crop": crop,
            "crop_resize": list(crop_resize),
            "crop_min": crop_min,
            "crop_max": crop_max,
        }
        self.val_transforms = make_val_transforms(val_size=self.val_size, max_size=self.max_size)
        # Only the categories are needed now; setup() builds the datasets.
        val_json = load_coco_json(self.val_annotation_file)
        self._val_categories = category_names(val_json["categories"])
        self.label_map = LabelMap.from_coco(val_json, label_mapping)
        self.label_map.source = str(self.val_annotation_file)
        del val_json
        self.per_device_batch_size = self.batch_size
        self.per_device_val_batch_size = self.val_batch_size
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None

    @property
    def num_classes(self) -> int:
        """Number of class labels (without "no object"); the model's ``num_classes``."""
        return self.label_map.num_classes

    def evaluation_settings(self) -> dict[str, Any]:
        """What evaluating a model trained on this data needs: the validation split (root or
        synthetic parameters), its preprocessing, label mapping and batch size. Stored in
        checkpoints, so ``eval.py ckpt_path=...`` needs no ``data.*`` overrides."""
        return {
            "root": None if self.synthetic is not None else str(self.root.resolve()),
            "synthetic": self.synthetic,
            "val_images": str(self.hparams.val_images),
            "val_annotations": str(self.hparams.val_annotations),
            "val_size": self.val_size,
            "max_size": self.max_size,
            "val_batch_size": self.val_batch_size,
            "label_mapping": self.label_mapping,
            "pad_to": None if self.pad_to is None else _plain_pad_to(self.pad_to),
        }

    def _training_order(self) -> dict[str, Any]:
        """What fixes each epoch's training order on each rank (see data.sampler)."""
        trainer = self.trainer
        return {
            "seed": self.seed,
            "world_size": trainer.world_size if trainer is not None else 1,
            "per_device_batch_size": self.per_device_batch_size,
            "group_by_aspect_ratio": self.group_by_aspect_ratio,
            "train_images": len(self.train_dataset) if self.train_dataset is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Saved in training checkpoints: the settings of the training order and whether the
        checkpoint falls within an epoch, which a resume checks (:meth:`load_state_dict`)."""
        trainer, mid_epoch = self.trainer, False
        if trainer is not None:
            mid_epoch = 0 < compat.trained_batches(trainer) < trainer.num_training_batches
        return {"training_order": self._training_order(), "mid_epoch": bool(mid_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when a resume from within an epoch orders that epoch otherwise than the
        checkpoint's run did: it then trains some of its images twice and leaves out others.
        (From an epoch's end any settings continue exactly as a new epoch would start.)"""
        saved = state_dict.get("training_order")
        if not saved or not state_dict.get("mid_epoch"):
            return
        now = self._training_order()
        changed = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
        if changed:
            log.warning(
                "resuming with other training-order settings than the checkpoint's run (%s): "
                "the rest of the epoch it stopped in is not the one that run would have "
                "trained (some images repeat, others are left out); later epochs are whole",
                ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
            )

    def use_label_map(self, label_map: LabelMap | Mapping[str, Any]) -> None:
        """Label the data with ``label_map`` (e.g. a checkpoint's) instead of the file's own.

        Accepts a ``LabelMap`` or its ``to_dict()`` form. Every category of the validation file
        must be in the map; datasets already built are rebuilt on next use when the map
        differs from the one they were labelled with.
        """
        if not isinstance(label_map, LabelMap):
            label_map = LabelMap.from_dict(label_map)
        unknown = sorted(set(self._val_categories) - set(label_map.category_ids))
        if unknown:
            raise ValueError(
                f"{self.val_annotation_file} has category ids {unknown} that the given label map "
                f"does not know (it maps {label_map.num_classes} labels to ids "
                f"{[c for c in label_map.category_ids if c >= 0]}); evaluate on annotations with "
                "the categories the model was trained on"
            )
        if label_map.to_dict() == self.label_map.to_dict():
            return  # the data's own labels (evaluation of a model trained on this data)
        self.label_map = label_map
        self.train_dataset = None
        self.val_dataset = None

    def prepare_data(self) -> None:
        """Nothing to download; the synthetic dataset was generated at construction."""

    def setup(self, stage: str | None = None) -> None:
        """Derive per-device batch sizes and build the datasets ``stage`` needs."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1))
        self.per_device_batch_size = _per_device(
            self.batch_size, world_size, "batch_size", accumulate
        )
        if self._val_batch_follows_train:
            # validation batches as large as one forward pass of training, not as the step
            self.val_batch_size = self.batch_size // accumulate
        self.per_device_val_batch_size = _per_device(
            self.val_batch_size, world_size, "val_batch_size"
        )
        if self.num_workers is None:
            self.num_workers = default_num_workers(getattr(self.trainer, "num_devices", 1))
        if self.pin_memory is None:
            accelerator = getattr(self.trainer, "accelerator", None)
            self.pin_memory = type(accelerator).__name__ == "CUDAAccelerator"
        self.build_datasets(stage)

    def build_datasets(self, stage: str | None = None) -> None:
        """Build (and check) the datasets ``stage`` needs now, as ``setup`` would: the entry
        points call it before the trainer starts, so that a data error (a missing image, a bad
        annotation) is reported before any training work."""
        if stage in (None, "fit"):
            self._get_train_dataset()
        self._get_val_dataset()

    def _get_train_dataset(self) -> CocoDetection:
        if self.train_dataset is None:
            dataset = CocoDetection(
                self.train_image_dir,
                self.train_annotation_file,
                transforms=make_train_transforms(**self._train_augmentation),
                label_map=self.label_map,
                strict=self.strict,
            )
            train_categories = category_names(dataset.categories)
            if train_categories != self._val_categories:
                raise ValueError(
                    f"the categories of {self.train_annotation_file} differ from those of "
                    f"{self.val_annotation_file} ({train_categories} vs "
                    f"{self._val_categories}); both splits must declare the same 'categories'"
                )
            _log_summary(split_report("train", dataset))
            self.train_dataset = dataset
        return self.train_dataset

    def _get_val_dataset(self) -> CocoDetection:
        if self.val_dataset is None:
            # COCO evaluation takes its ground truth (crowd regions and areas included) from the
            # annotation file; the samples only feed the model and its validation loss.
            dataset = CocoDetection(
                self.val_image_dir,
                self.val_annotation_file,
                transforms=self.val_transforms,
                label_map=self.label_map,
                strict=self.strict,
            )
            _log_summary(split_report("val", dataset, evaluated=True))
            self.val_dataset = dataset
        return self.val_dataset

    def _loader(
        self, dataset: CocoDetection, batch_size: int, sampler: EpochSeededSampler | None = None
    ) -> DataLoader:
        """Batches in ``sampler`` order (resumable within an epoch, see
        :class:`ResumableDataLoader`), or in file order without one."""
        num_workers = self.num_workers if self.num_workers is not None else 0
        context = _worker_context(self.worker_start) if num_workers > 0 else None
        return (DataLoader if sampler is None else ResumableDataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            pin_memory=bool(self.pin_memory),
            persistent_workers=self.persistent_workers and num_workers > 0,
            collate_fn=self.collate,
            multiprocessing_context=context,
            # A DataLoader without a generator of its own draws its workers' base seed from the
            # global RNG at every new iterator, which shifts the dropout of every later step;
            # a resume from mid-epoch makes one iterator more than the uninterrupted run. The
            # samples' augmentations do not use it (their seeds come from the sampler).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``per_device_batch_size`` images.

        Order and augmentations are a function of (``seed``, epoch, image) only, on every rank
        (see :mod:`detr_lightning.data.sampler`), so resumed runs repeat them exactly, from
        the batch after the last one trained, also when the checkpoint was written mid-epoch.
        With ``group_by_aspect_ratio`` each batch holds images of similar size after
        augmentation.
        """
        trainer = self.trainer
        dataset = self._get_train_dataset()
        grouped = self.group_by_aspect_ratio and self.per_device_batch_size > 1
        sampler = EpochSeededSampler(
            dataset,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=self.seed,
            epoch_source=(lambda: trainer.current_epoch) if trainer is not None else None,
            trained_source=(
                (lambda: compat.trained_batches(trainer) * self.per_device_batch_size)
                if trainer is not None
                else None
            ),
            group_batch_size=self.per_device_batch_size if grouped else None,
            size_of=(lambda index, seed: dataset.output_size((index, seed))) if grouped else None,
        )
        return self._loader(dataset, self.per_device_batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``per_device_val_batch_size`` images, in file order."""
        return self._loader(self._get_val_dataset(), self.per_device_val_batch_size)

    def test_dataloader(self) -> DataLoader:
        """The validation split (COCO test-dev has no public annotations)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation split, for writing predictions."""
        return self.val_dataloader()


def _plain_pad_to(pad_to: int | tuple) -> int | list[list[int]]:
    """``pad_to`` as a config stores it (lists, not tuples)."""
    return pad_to if isinstance(pad_to, int) else [list(canvas) for canvas in pad_to]


def _log_summary(report: SplitReport) -> None:
    """Log one line about a built split; raise on what CocoDetection leaves to evaluation
    (annotation ids or keys that COCO evaluation would trip over after a whole epoch)."""
    errors = [f for f in report.findings if f.severity == ERROR]
    if errors:
        details = "; ".join(f"{f.message} (e.g. {', '.join(f.items[:3])})" for f in errors)
        raise ValueError(
            f"{report.annotation_file}: {details}. detr-validate lists every problem of the dataset"
        )
    warned = any(f.severity == WARNING for f in report.findings)
    log.log(logging.WARNING if warned else logging.INFO, "%s", summary_line(report))
