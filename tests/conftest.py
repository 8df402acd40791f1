"""Shared test set-up: deterministic, quiet, CPU-sized."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread per test process: with pytest-xdist the workers share the cores, and
# OpenMP threads that wait on a descheduled peer make every op ~10x slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def malloc_calls(monkeypatch) -> list[str]:
    """The entry points' calls of ``host_memory.reuse_freed_memory``, recorded, not made: it
    sets malloc for the whole process, and one test process runs many tests
    (tests/test_host_memory.py runs the real one in processes of its own)."""
    from detr_lightning.utils import host_memory

    calls: list[str] = []
    monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: calls.append("reuse") or True)
    return calls


# Synthetic datasets of the tests go to a throw-away cache, never to the user's.
if "DETR_LIGHTNING_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DETR_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="detr-lightning-test-cache-")
    # each test process makes its own; none should outlive the run
    atexit.register(shutil.rmtree, os.environ["DETR_LIGHTNING_CACHE"], ignore_errors=True)
