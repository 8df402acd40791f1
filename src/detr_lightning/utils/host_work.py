"""Count the host's work in a piece of code: the operators it dispatches, and the reads of
device data that make the host wait for the device (host syncs).

On a GPU every operator is a kernel launch the host must issue, and every read of a device
tensor's value on the host (``.item()``, ``bool(tensor)``, ``.tolist()``, a copy to the CPU,
``nonzero`` and other ops whose output size depends on the data) stops the host until the
device has caught up, leaving the GPU idle while the host prepares what comes next. Both
counts are properties of the program, not of the machine, so they are measured the same way on
a CPU, where they tell what a GPU run would pay:

    with HostWorkCounter(device_type="cpu") as work:
        loss = model(images).sum()
        loss.backward()
    work.operators, work.syncs         # {"aten.mul.Tensor": 2, ...}, {"item()/bool()": 1}

Operators are counted at the dispatcher (``TorchDispatchMode``): every ATen operator, forward
and backward. Syncs are the operators that read device data on the host, plus, for a CPU run
(``device_type="cpu"``), the tensor methods that would copy device data to the host on a GPU
(``.cpu()``, ``.tolist()``), which on a CPU reach no operator.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPERATORS", "HostWorkCounter"]

# Operators that read device data on the host, by the name they are reported under. The size
# of nonzero's, masked_select's and unique's outputs depends on the data: the host must read
# it to allocate them.
SYNC_OPERATORS = {
    "aten._local_scalar_dense.default": "item()/bool()/int()/float()",
    "aten.nonzero.default": "nonzero",
    "aten.equal.default": "equal",
    "aten.masked_select.default": "masked_select",
    "aten._unique2.default": "unique",
    "aten.unique_consecutive.default": "unique",
    "aten.unique_dim.default": "unique",
    "aten.repeat_interleave.Tensor": "repeat_interleave(Tensor)",
}
# What a CPU run counts for the copies to the host that it does not dispatch. Not
# ``.numpy()``: it takes a host tensor only, so on a GPU its copy is the ``.cpu()`` before it.
HOST_READ_METHODS = ("cpu", "tolist")

_PATCH_LOCK = threading.Lock()


class HostWorkCounter(TorchDispatchMode):
    """Counts operators and host syncs while active (a context manager; re-entrant use is not
    supported). ``device_type``: where the counted work runs. ``"cpu"`` adds the host reads
    that a CPU run does not dispatch (see the module docstring), and counts every read of a
    tensor's value, since on a CPU the data that would live on a device cannot be told from
    the host's own (with ``data.num_workers=0``, the data loading's reads count too); a
    device type (``"cuda"``) counts the reads of device tensors only; None counts every
    read.

    After the ``with`` block, :attr:`operators` counts each operator by name and :attr:`syncs`
    each kind of host sync; :attr:`num_operators` and :attr:`num_syncs` are their totals.
    """

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.operators: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def num_operators(self) -> int:
        return sum(self.operators.values())

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    def reset(self) -> None:
        """Start the counts afresh (the mode stays active)."""
        self.operators.clear()
        self.syncs.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.operators[name] += 1
        kind = SYNC_OPERATORS.get(name)
        if kind is not None and self.device_type not in (None, "cpu") and _on_host(args):
            kind = None  # reads a host tensor: no wait for the device
        if kind is None and name in ("aten._to_copy.default", "aten.copy_.default"):
            kind = _device_to_host(name, args, kwargs)
        if kind is not None:
            self.syncs[kind] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostWorkCounter:
        if self.device_type == "cpu":
            self._patch_host_reads()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._restore_host_reads()

    def _patch_host_reads(self) -> None:
        with _PATCH_LOCK:
            for method in HOST_READ_METHODS:
                original = getattr(torch.Tensor, method)
                self._saved[method] = original
                setattr(torch.Tensor, method, self._counted(method, original))

    def _restore_host_reads(self) -> None:
        with _PATCH_LOCK:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()

    def _counted(self, method: str, original: Any) -> Any:
        counter = self

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type == "cpu":  # a device run dispatches its copy: counted there
                counter.syncs[f".{method}()"] += 1
            return original(tensor, *args, **kwargs)

        return read


def _on_host(args: tuple) -> bool:
    """Whether every tensor among ``args`` is on the CPU."""
    return all(arg.device.type == "cpu" for arg in args if isinstance(arg, torch.Tensor))


def _device_to_host(name: str, args: tuple, kwargs: dict) -> str | None:
    """``"device-to-host copy"`` when a copy operator moves device data to the CPU."""
    if name == "aten._to_copy.default":
        source, target = args[0], kwargs.get("device")
        to_host = target is not None and torch.device(target).type == "cpu"
        if to_host and isinstance(source, torch.Tensor) and source.device.type != "cpu":
            return "device-to-host copy"
        return None
    destination, source = args[0], args[1]
    if destination.device.type == "cpu" and source.device.type != "cpu":
        return "device-to-host copy"
    return None
