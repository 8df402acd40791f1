"""The host-work counter: operators dispatched and host syncs, counted against hand counts."""

from __future__ import annotations

import torch

from detr_lightning.utils.host_work import HostWorkCounter, _device_to_host


def test_counts_each_dispatched_operator_by_name():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    with HostWorkCounter() as work:
        c = torch.mul(a, b)
        d = torch.add(c, a)
        d.sum()
    assert dict(work.operators) == {"aten.mul.Tensor": 1, "aten.add.Tensor": 1,
                                    "aten.sum.default": 1}  # fmt: skip
    assert work.num_operators == 3 and work.num_syncs == 0


def test_backward_operators_count_too():
    w = torch.ones(3, requires_grad=True)
    x = torch.arange(3.0)
    with HostWorkCounter() as work:
        (w * x).sum().backward()
    # forward: mul, sum; backward: sum's grad expands, mul's grad multiplies by x
    assert work.operators["aten.mul.Tensor"] == 2, work.operators
    assert work.operators["aten.sum.default"] == 1
    assert torch.equal(w.grad, x)


def test_an_item_counts_one_sync():
    loss = torch.tensor([1.5, 2.5]).sum()
    with HostWorkCounter() as work:
        value = loss.item()
    assert value == 4.0
    assert dict(work.syncs) == {"item()/bool()/int()/float()": 1}


def test_bool_of_a_tensor_and_nonzero_are_syncs():
    x = torch.tensor([0.0, 1.0, 2.0])
    with HostWorkCounter() as work:
        if (x > 1).any():  # bool(tensor): is_nonzero reads the value
            pass
        x.nonzero()
        torch.equal(x, x)
    assert work.syncs == {"item()/bool()/int()/float()": 1, "nonzero": 1, "equal": 1}
    assert work.num_syncs == 3


def test_a_cpu_run_counts_the_copies_a_gpu_would_make():
    x = torch.arange(4.0)
    original_cpu = torch.Tensor.cpu
    with HostWorkCounter(device_type="cpu") as work:
        x.cpu()
        x.tolist()
        x.numpy()  # its copy on a GPU is the .cpu() before it, counted once there
    assert work.syncs == {".cpu()": 1, ".tolist()": 1}
    assert torch.Tensor.cpu is original_cpu  # the methods are restored on exit
    with HostWorkCounter() as work:  # a device run counts only what it dispatches
        x.cpu()
        x.tolist()
    assert work.num_syncs == 0


def test_device_to_host_copies_are_recognised():
    on_device = torch.empty(3, device="meta")
    on_host = torch.empty(3)
    to_cpu = {"device": torch.device("cpu")}
    assert _device_to_host("aten._to_copy.default", (on_device,), to_cpu) == "device-to-host copy"
    assert _device_to_host("aten._to_copy.default", (on_host,), to_cpu) is None
    assert _device_to_host("aten._to_copy.default", (on_device,), {"dtype": torch.half}) is None
    assert _device_to_host("aten.copy_.default", (on_host, on_device), {}) == "device-to-host copy"
    assert _device_to_host("aten.copy_.default", (on_device, on_host), {}) is None


def test_reset_starts_the_counts_afresh():
    x = torch.ones(2)
    with HostWorkCounter() as work:
        x.sum().item()
        work.reset()
        x + x
    assert dict(work.operators) == {"aten.add.Tensor": 1} and work.num_syncs == 0


def test_a_device_run_does_not_count_reads_of_host_tensors():
    host = torch.tensor([2.0])
    with HostWorkCounter(device_type="cuda") as work:
        host.item()  # no device to wait for
    assert work.num_syncs == 0 and work.operators["aten._local_scalar_dense.default"] == 1
    with HostWorkCounter(device_type="cpu") as work:
        host.item()  # on a CPU run it stands for a read of device data
    assert work.num_syncs == 1
