"""The first training samples of a run, drawn as training augments them (``detr-preview``).

Which samples and which augmentations: the training data module's
:class:`~detr_lightning.data.sampler.EpochSeededSampler` yields ``(index, sample_seed)`` keys,
with the sample seed a function of (``data.seed``, epoch, index) alone, and
:class:`~detr_lightning.data.coco.CocoDetection` runs each sample's random transforms under its
seed. :func:`training_keys` builds that sampler as
:meth:`~detr_lightning.lightning.CocoDataModule.train_dataloader` does, so that

- each sample is augmented exactly as in that epoch of training, whatever the devices, batch
  size, workers or grouping (they change only the order);
- with the run's world size, per-device batch and ``group_by_aspect_ratio``, the samples come in
  the order that rank ``rank`` trains them: the first ``num_samples`` of its epoch, i.e. its
  first batches, in batch order.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data.coco import CocoDetection
from ..data.sampler import EpochSeededSampler
from ..viz.augmentation_grid import augmentation_grid, save_png

__all__ = [
    "PreviewSample",
    "caption",
    "per_device_batch_size",
    "preview_samples",
    "training_keys",
    "write_preview",
]


@dataclass
class PreviewSample:
    """One training sample: its sampler key, the augmented pair and, if asked, the original."""

    key: tuple[int, int]  # (dataset index, sample seed), as the training sampler yields it
    image: Tensor  # float32 [3, H, W], normalized as the model receives it
    target: dict[str, Any]  # the training target (normalized cxcywh boxes, labels, ids, sizes)
    file_name: str
    original: tuple[Tensor, dict[str, Any]] | None = None  # float [3, h, w] in [0, 1], target


def per_device_batch_size(batch_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    """Images per device and forward pass of the global ``data.batch_size``, as training
    divides it (ValueError naming the keys when it does not divide)."""
    parts = world_size * accumulate
    if batch_size < 1 or world_size < 1 or accumulate < 1 or batch_size % parts:
        raise ValueError(
            f"data.batch_size={batch_size} must be a positive multiple of the world size "
            f"{world_size} x trainer.accumulate_grad_batches {accumulate}; choose a multiple "
            f"of {parts}"
        )
    return batch_size // parts


def training_keys(
    dataset: CocoDetection,
    num_samples: int,
    *,
    seed: int,
    epoch: int = 0,
    world_size: int = 1,
    rank: int = 0,
    batch_size: int = 1,
    group_by_aspect_ratio: bool = True,
) -> list[tuple[int, int]]:
    """The first ``num_samples`` (index, sample seed) keys of ``epoch`` on ``rank``.

    ``batch_size`` is the per-device batch (:func:`per_device_batch_size`); with
    ``group_by_aspect_ratio`` and a batch above one, samples are grouped by output size as in
    training. Fewer keys come back when the rank's epoch is shorter.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    grouped = group_by_aspect_ratio and batch_size > 1
    sampler = EpochSeededSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        seed=seed,
        group_batch_size=batch_size if grouped else None,
        size_of=(lambda index, key_seed: dataset.output_size((index, key_seed)))
        if grouped
        else None,
    )
    sampler.set_epoch(epoch)
    return list(itertools.islice(sampler, num_samples))


def preview_samples(
    dataset: CocoDetection, keys: Sequence[tuple[int, int]], *, originals: bool = False
) -> list[PreviewSample]:
    """The augmented samples of ``keys`` (as ``dataset[key]`` returns them in training) and,
    with ``originals``, each file's image and target without the transforms."""
    plain = None
    if originals:
        plain = copy.copy(dataset)  # the same records and labels, no transforms
        plain.transforms = None
    samples = []
    for index, seed in keys:
        image, target = dataset[(index, seed)]
        original = plain[index] if plain is not None else None
        name = dataset.image_path(index).name
        samples.append(PreviewSample((index, seed), image, target, name, original))
    return samples


def caption(sample: PreviewSample) -> str:
    """``file (id N): HxW``, with the original's size first when it is shown."""
    height, width = (int(v) for v in sample.target["size"])
    size = f"{height}x{width}"
    if sample.original is not None:
        orig_h, orig_w = (int(v) for v in sample.original[1]["size"])
        size = f"{orig_h}x{orig_w} -> {size}"
    image_id, stand_in_for = sample.target["image_id"], sample.target.get("stand_in_for", -1)
    if stand_in_for != -1:  # the file does not decode: training shows the next readable one
        return f"{sample.file_name} (id {stand_in_for}, unreadable; shows id {image_id}): {size}"
    return f"{sample.file_name} (id {image_id}): {size}"


def write_preview(
    dataset: CocoDetection,
    class_names: Sequence[str],
    output: str | Path,
    *,
    num_samples: int = 16,
    columns: int = 4,
    tile_size: int = 384,
    show_original: bool = False,
    **order: Any,
) -> tuple[Path, list[PreviewSample]]:
    """Write the grid PNG of the first ``num_samples`` training samples to ``output``.

    ``order`` takes :func:`training_keys`' keywords (``seed``, ``epoch``, ``world_size``,
    ``rank``, ``batch_size``, ``group_by_aspect_ratio``). Returns the file and the samples.
    """
    if num_samples < 1 or columns < 1:
        raise ValueError(
            f"num_samples={num_samples} and columns={columns}: both must be at least 1"
        )
    keys = training_keys(dataset, num_samples, **order)
    samples = preview_samples(dataset, keys, originals=show_original)
    grid = augmentation_grid(
        [(s.image, s.target) for s in samples],
        class_names,
        captions=[caption(s) for s in samples],
        originals=[s.original for s in samples if s.original is not None] or None,
        columns=columns,
        tile_size=tile_size,
    )
    return save_png(grid, output), samples
