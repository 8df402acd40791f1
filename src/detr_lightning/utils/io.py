"""Crash-safe file writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# suffix of the temporary files of atomic_write (a crash can leave one behind)
TMP_SUFFIX = ".tmp"


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it over
    ``target``: readers and crashes (a kill, a power loss) never see half a file.

    The temporary file is ``.<name>.<random>.tmp`` in the same directory (a rename is atomic
    only within one file system); its data is flushed to disk before the rename, and the
    directory entry after it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the permissions of an ordinary file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    return target


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """JSON through :func:`atomic_write` (NaN allowed, as COCO's -1/NaN statistics need)."""
    text = json.dumps(payload, indent=2, allow_nan=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
