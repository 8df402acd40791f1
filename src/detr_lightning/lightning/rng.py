"""Random state of a training run: the seed of each training batch on each rank (dropout
draws from it), and the RNG states a checkpoint carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..data.sampler import sample_seed

__all__ = ["batch_seed", "capture_rng_states", "restore_rng_states"]

_RANK_STRIDE = 0xD6E8FEB86659FD93  # odd: ranks never share a batch seed in practice


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The global RNG's seed for training batch ``batch_idx`` of ``epoch`` on ``rank``."""
    return sample_seed(seed + 1 + rank * _RANK_STRIDE, epoch, batch_idx)


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain containers."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
