"""What the entry points print: a user's setup error as one line, not a traceback, and no
third-party notices that need no action (Lightning's product tips, a deprecation inside
Lightning itself)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..utils.errors import SetupError, TrainingStopped
from . import hydra_dirs


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # the tips, and the note that the run's own model summary replaces Lightning's
        return not str(record.msg).startswith(
            ("💡 Tip:", "Trainer already configured with model summary callbacks")
        )


def quiet_third_party() -> None:
    """Install the filters (idempotent); called by the train and eval entry points."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    # raised inside pytorch_lightning.utilities._pytree on every fit with torch >= 2.10;
    # nothing in this project or the user's config can act on it
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
    )
    # DETRModule logs the training losses' epoch means already summed over the ranks
    # (epoch_sums.py): Lightning's advice to sync them across devices does not apply
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self\.log\('train/.*sync_dist=True"
    )


def exit_on_setup_error(function: Callable[[Any], Any], cfg: Any) -> Any:
    """Run an entry point's ``function(cfg)`` and return its result; a SetupError or
    TrainingStopped prints ``error: <message>`` to stderr and exits with status 1. SystemExit
    passes through Hydra's error handler, so the user sees the message alone, without a
    traceback."""
    try:
        return function(cfg)
    except (SetupError, TrainingStopped) as err:
        if isinstance(err, SetupError):
            remove_unused_run_dir(cfg)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def remove_unused_run_dir(cfg: Any) -> None:
    """A run stopped by a setup error before it wrote anything leaves no folder behind: the
    run dir that Hydra made for it (``outputs/<task>/<time>/``; never a ``run_dir`` the user
    named) is removed when it holds nothing but Hydra's ``.hydra/`` and the log, which says
    no more than the error printed; so are ``outputs/<task>/`` and ``outputs/`` if that
    leaves them empty."""
    try:
        if hydra_dirs.run_dir_given(cfg) or "run_dir" not in cfg:
            return
        run_dir = Path(str(cfg.run_dir)).resolve()
    except Exception:  # no Hydra context (a call from Python): nothing of Hydra's to remove
        return
    if not run_dir.is_dir() or run_dir == Path.cwd().resolve():
        return
    if any(entry.name != ".hydra" and entry.suffix != ".log" for entry in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):
        if parent.name and parent != Path.cwd().resolve():
            with contextlib.suppress(OSError):  # not empty: kept
                parent.rmdir()
