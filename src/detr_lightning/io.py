"""Crash-safe file writes and conversion of config containers to plain Python."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it over
    ``target``: readers and crashes never see half a file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the permissions of an ordinary file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """JSON through :func:`atomic_write` (NaN allowed, as COCO's -1/NaN statistics need)."""
    text = json.dumps(payload, indent=2, allow_nan=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def to_plain(value: Any) -> Any:
    """OmegaConf containers, mappings and tuples -> dicts and lists of builtins (JSON-able)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
