"""glibc malloc set to reuse freed memory, for CPU inference at full resolution.

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and returns it
to the OS at ``free``. The threshold starts at 128 KB and rises to the largest such block
freed so far, but never above 32 MB. The next allocation of that size gets new pages, which
the kernel faults in and fills with zeros one by one. DETR at full resolution allocates such
tensors all the time: a ResNet-101 activation at 800x1066 is 55 MB, and one forward of the
model on an image of that size took 93,000 page faults (365 MB zeroed) on a 2-core CPU. Told
to keep what it frees, malloc hands the same pages out again. On that CPU
(``bench/inference_hf.py``, two runs each way) the model took 2.09-2.21 s per image instead
of 2.53-2.60 s, and ``predict.py`` took 35.6-36.1 s instead of 40.2-40.4 s for ten 640x480
JPEGs. transformers' DETR, which allocates four times as much, went from 3.58-3.86 to
2.55-2.61 s.

The price is memory that is not given back: the peak hardly moves (that ``predict.py`` run:
1.93-1.95 GB against 1.87-1.90 GB), but the process stays near it between images instead of
falling back (free memory at the heap's top is kept up to 2 GiB). Data-loader workers forked
afterwards (``eval.py``'s) inherit the setting and keep their own peaks too. It holds for the
main thread, where the entry points allocate their tensors: glibc gives other threads heaps
of their own, which still ``mmap`` blocks over 64 MB and return an empty heap to the OS.

That suits a process that does one job, as ``predict.py`` and ``eval.py`` on a CPU: they
call :func:`reuse_freed_memory` unless ``reuse_freed_memory=false`` (``eval.py`` in every
process of a multi-process run, from a callback). ``train.py`` does not: at
``bench/train_speed.py``'s small CPU config (one epoch, alternating runs) an epoch ran at 9.57 /
9.58 images/s with it against 11.35 / 10.10 without. A library call never changes it: it is
a setting of the whole process, for its owner to make.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from .errors import SetupError

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_ALL = 2**31 - 1  # M_TRIM_THRESHOLD takes an int: the heap's free top is kept up to 2 GiB

# Where a user has already chosen: glibc's variables (MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_,
# ...) and tunables, or another allocator.
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def user_malloc_setting(environ: Mapping[str, str] = os.environ) -> str | None:
    """The user's own malloc configuration in ``environ`` (a variable, a glibc tunable or a
    preloaded allocator), described, or None."""
    for name in sorted(environ):
        if name.startswith("MALLOC_"):
            return f"{name}={environ[name]}"
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return f"GLIBC_TUNABLES={tunables}"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return f"LD_PRELOAD={preload}"
    return None


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the one with ``mallopt``), else None (musl, macOS,
    Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def why_not_reused() -> str | None:
    """Why :func:`reuse_freed_memory` would leave malloc alone here, or None if it would not."""
    chosen = user_malloc_setting()
    if chosen is not None:
        return f"the environment sets malloc ({chosen})"
    if _glibc() is None:
        return "the C library is not glibc"
    return None


def reuse_freed_memory() -> bool:
    """Set glibc's malloc, for the rest of the process, to keep freed memory for reuse: no
    allocation through ``mmap``, no trimming of the heap (see the module's docstring).

    Returns whether it did. It does nothing (and says so at INFO level) where the C library
    is not glibc or the environment already configures malloc (any ``MALLOC_*`` variable,
    ``GLIBC_TUNABLES=glibc.malloc...``, a preloaded jemalloc/tcmalloc/mimalloc): the user's
    choice wins.
    """
    reason = why_not_reused()
    if reason is not None:
        log.info("malloc left as it is: %s", reason)
        return False
    libc = _glibc()
    assert libc is not None  # checked by why_not_reused
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)):
        log.warning("glibc refused a malloc setting (mallopt); freed memory may go back to the OS")
        return False
    log.info(
        "malloc keeps freed memory for reuse (set reuse_freed_memory=false for glibc's defaults)"
    )
    return True


def reuse_setting(value: Any) -> bool:
    """``reuse_freed_memory`` of conf/predict.yaml and conf/eval.yaml: true or false."""
    if not isinstance(value, bool):
        raise SetupError(
            f"reuse_freed_memory={value!r}: true (malloc keeps freed memory for reuse on a CPU "
            "run) or false (glibc's defaults)"
        )
    return value


__all__ = ["reuse_freed_memory", "reuse_setting", "user_malloc_setting", "why_not_reused"]
