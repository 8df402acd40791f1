"""The training losses' epoch means, kept where a checkpoint can hold them.

Lightning averages a value logged with ``on_epoch=True`` in its logger connector, whose sums are
not in its checkpoints: a run resumed in the middle of an epoch (a SIGTERM stop, the step
checkpoint after a kill, a SLURM requeue) reported for that epoch the mean of the batches after
the resume only, in metrics.json and every logger. :class:`EpochSums` keeps the sums in the
module instead, and a checkpoint carries them.

Not torchmetrics' aggregators: a ``MeanMetric`` per value syncs each one at the epoch's end
(here one all-reduce of one stacked tensor), its default NaN check reads every update on the
host (a device sync per step), and with that check off (``nan_strategy="disable"``)
torchmetrics 1.9 drops the weights, averaging batches of different sizes as equals. Nor would
its state load on one rank only, which a resume onto another number of ranks needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..ops.distributed import all_reduce_sum


class EpochSums:
    """Weighted sums of named values over this rank's batches of one epoch (``epoch``), and
    their means (or totals) over all ranks.

    ``add`` keeps device tensors and never waits for the device. ``means`` and ``state_dict``
    sum over the ranks (one all-reduce): every rank must call them at the same point, and every
    rank must have added the same names. A checkpoint holds the sums over all ranks;
    ``load_state_dict`` gives them to one rank (rank 0) and zeros to the others, so that the
    next sum over ranks counts them once, whatever the number of ranks of the resumed run.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self, epoch: int | None = None) -> None:
        """Start the sums of ``epoch`` afresh."""
        self.epoch = epoch
        # one device tensor per set of names that ``add`` takes together: a step adds all of
        # its values with a few kernels, not a few per value
        self._totals: dict[tuple[str, ...], Tensor] = {}
        self._weights: dict[str, float] = {}
        self._is_mean: dict[str, bool] = {}
        self._restored: dict[str, float] = {}  # from a checkpoint, until their next ``add``
        self._device: torch.device | None = None
        self._means: dict[str, float] | None = None

    def add(self, values: Mapping[str, Tensor], weight: float = 1.0, mean: bool = True) -> None:
        """Add ``values`` with ``weight`` (a batch size); ``mean=False``: report the total."""
        names = tuple(values)
        with torch.no_grad():  # one operator, not a detach per value
            batch = torch.stack(list(values.values()))
        batch = batch.to(_sum_dtype(batch.device)) * weight
        total = self._totals.get(names)
        if total is None and any(name in self._restored for name in names):
            restored = [self._restored.pop(name, 0.0) for name in names]
            total = torch.tensor(restored, dtype=batch.dtype, device=batch.device)
        self._totals[names] = batch if total is None else total + batch
        for name in names:
            self._weights[name] = self._weights.get(name, 0.0) + weight
            self._is_mean[name] = mean
        self._means = None

    def _summed(self) -> tuple[list[str], list[float], list[float]]:
        keys = [name for names in self._totals for name in names] + list(self._restored)
        if not keys:
            return [], [], []
        parts = list(self._totals.values())
        device = parts[0].device if parts else self._device
        dtype = _sum_dtype(device)
        if self._restored:
            parts.append(torch.tensor(list(self._restored.values()), dtype=dtype, device=device))
        names = sorted(set(keys))
        index = torch.tensor([names.index(key) for key in keys], device=device)
        totals = torch.zeros(len(names), dtype=dtype, device=device)
        totals.index_add_(0, index, torch.cat(parts))
        weights = torch.tensor([self._weights[name] for name in names], dtype=dtype,
                               device=device)  # fmt: skip
        summed = all_reduce_sum(torch.stack([totals, weights])).cpu()
        return names, summed[0].tolist(), summed[1].tolist()

    def means(self) -> dict[str, float]:
        """Each value's weighted mean (its total for ``mean=False``) over all ranks' batches of
        the epoch so far; computed once between two ``add`` calls."""
        if self._means is None:
            names, totals, weights = self._summed()
            self._means = {
                name: total / weight if self._is_mean[name] else total
                for name, total, weight in zip(names, totals, weights, strict=True)
                if weight > 0
            }
        return self._means

    def state_dict(self) -> dict[str, Any]:
        names, totals, weights = self._summed()
        means = [self._is_mean[name] for name in names]
        return {"epoch": self.epoch, "names": names, "totals": totals, "weights": weights,
                "means": means}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device,
                        keep: bool = True) -> None:  # fmt: skip
        """The sums of ``state`` (from :meth:`state_dict`), or zeros under the same names
        where not ``keep``."""
        self.reset(state.get("epoch"))
        self._device = torch.device(device)
        for name, total, weight, mean in zip(state["names"], state["totals"], state["weights"],
                                             state["means"], strict=True):  # fmt: skip
            self._restored[name] = float(total) if keep else 0.0
            self._weights[name] = float(weight) if keep else 0.0
            self._is_mean[name] = bool(mean)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sums, float32 where the device has no float64 (Apple's MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
