"""A training sampler whose order and augmentations depend only on (seed, epoch, index).

Lightning resumes weights, optimizer and loop counters, but the shuffling order and the random
augmentations of a plain DataLoader come from the global RNG, whose state differs after a
restart, with another number of workers, or on another rank. This sampler yields
``(index, sample_seed)`` pairs; :class:`~detr_lightning.data.coco.CocoDetection` runs the
transforms of that sample under ``sample_seed``. A resumed run therefore sees exactly the
batches the uninterrupted run would have seen.

It subclasses ``DistributedSampler`` (with the rank and world size given explicitly), so
Lightning keeps it instead of substituting its own under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

from torch.utils.data import DistributedSampler

# Large odd multipliers spread (seed, epoch, index) over 63 bits without collisions in practice.
_EPOCH_STRIDE = 0x9E3779B97F4A7C15
_INDEX_STRIDE = 0xBF58476D1CE4E5B9


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (non-negative, < 2**63)."""
    return (seed + epoch * _EPOCH_STRIDE + index * _INDEX_STRIDE) % (2**63)


class EpochSeededSampler(DistributedSampler):
    """Shuffled (index, sample_seed) pairs for one rank, reproducible per epoch.

    Args:
        dataset: anything with ``len``.
        num_replicas, rank: the data-parallel world (1 and 0 on a single device).
        seed: base seed of the run.
        epoch_source: returns the current epoch when iteration starts (e.g. the trainer's
            ``current_epoch``); Lightning's ``set_epoch`` calls are honoured as well, but a
            resumed run creates its first iterator before that call.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.epoch_source = epoch_source

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.epoch_source is not None:
            self.epoch = int(self.epoch_source())
        epoch = self.epoch
        for index in super().__iter__():
            yield index, sample_seed(self.seed, epoch, index)
