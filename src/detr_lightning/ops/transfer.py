"""Copies between the host and a device that do not make the host wait."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["host_to_device"]


def host_to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """A host tensor on ``device``, queued behind the device's work like a kernel.

    A copy to a GPU from pageable memory returns only once it is done, which is after
    everything queued before it: the host would wait for the device. From pinned memory the
    copy is queued and the host goes on.
    """
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
