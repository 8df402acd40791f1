"""glibc malloc set to reuse freed memory (detr_lightning.utils.host_memory), and its entry
points."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator

from detr_lightning.lightning.callbacks.memory import ReuseFreedMemory
from detr_lightning.utils.errors import SetupError
from detr_lightning.utils.host_memory import _glibc, reuse_setting, user_malloc_setting
from detr_lightning.utils.host_memory import reuse_freed_memory as real_reuse_freed_memory

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _glibc() is None, reason="needs Linux with glibc"
)

# Five rounds of allocating 64 MB (over glibc's largest mmap threshold, 32 MB), writing every
# page and freeing it; prints the page faults of each round. The process first imports what
# predict.py has imported when it sets malloc: with torch alone loaded, the heap cannot grow
# in place and glibc maps and unmaps the block anyway. Transparent huge pages are off
# for the process, so that a page is 4 KB whatever the machine's THP setting.
FAULTS = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    import torch
    import detr_lightning.cli.predict  # all that the entry point has loaded when it sets malloc
    from detr_lightning.utils.host_memory import reuse_freed_memory
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 * 2**20)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
    """
)


def _faults(mode: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    env.pop("LD_PRELOAD", None)
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_memory_is_reused_without_page_faults():
    """With glibc's defaults every 64 MB block comes back from the kernel, 16384 pages faulted
    in and zeroed each time; with the setting the pages are reused. The second round may fault
    once more: an aligned block need not fit the hole that the first one left when a small
    allocation took its edge."""
    pages = 64 * 2**20 // 4096
    default = _faults("default")
    assert all(count >= pages * 0.9 for count in default), default
    reused = _faults("reuse")
    assert reused[0] >= pages * 0.9, reused
    assert all(count < pages * 0.05 for count in reused[2:]), reused


@pytest.mark.parametrize(
    "environ, described",
    [
        ({}, None),
        ({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, None),
        ({"MALLOC_MMAP_MAX_": "0"}, "MALLOC_MMAP_MAX_=0"),
        ({"MALLOC_TRIM_THRESHOLD_": "1"}, "MALLOC_TRIM_THRESHOLD_=1"),
        ({"HOME": "/root", "MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX=2"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, None),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD=/usr/lib/libjemalloc.so.2"),
        ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "LD_PRELOAD=libtcmalloc_minimal.so.4"),
    ],
)
def test_the_users_malloc_setting_is_recognized(environ, described):
    assert user_malloc_setting(environ) == described


def test_the_environment_wins(monkeypatch, caplog):
    """A malloc setting in the environment leaves malloc alone (checked before any mallopt,
    so this runs in the test process)."""
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")

    def no_glibc_call():
        raise AssertionError("the environment's setting must win before glibc is looked up")

    monkeypatch.setattr("detr_lightning.utils.host_memory._glibc", no_glibc_call)
    with caplog.at_level(logging.INFO, logger="detr_lightning.utils.host_memory"):
        assert real_reuse_freed_memory() is False
    assert "the environment sets malloc (MALLOC_MMAP_MAX_=65536)" in caplog.text


def test_other_c_libraries_are_left_alone(monkeypatch, caplog):
    for name in [name for name in os.environ if name.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr("detr_lightning.utils.host_memory._glibc", lambda: None)
    with caplog.at_level(logging.INFO, logger="detr_lightning.utils.host_memory"):
        assert real_reuse_freed_memory() is False
    assert "not glibc" in caplog.text


def test_the_callback_sets_it_in_cpu_runs_only(malloc_calls):
    """eval.py sets malloc from a callback's setup, which runs in every process of the run."""
    ReuseFreedMemory().setup(SimpleNamespace(accelerator=CUDAAccelerator()), None, "test")
    assert malloc_calls == []
    ReuseFreedMemory().setup(SimpleNamespace(accelerator=CPUAccelerator()), None, "test")
    assert malloc_calls == ["reuse"]


def test_the_setting_is_a_bool():
    assert reuse_setting(True) is True and reuse_setting(False) is False
    for bad in (1, "true", None):
        with pytest.raises(SetupError, match=r"reuse_freed_memory=.*true .*or false"):
            reuse_setting(bad)
