"""Exceptions that the entry points report to the user as a message, not a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


class SetupError(Exception):
    """A problem with the user's setup found before any work starts.

    Entry points (train.py, eval.py) print its message alone, without a traceback, and exit with
    status 1; the message itself must say what is wrong and how to fix it.
    """


class TrainingStopped(Exception):
    """A run that stopped on purpose for a reason the user must act on (e.g. a loss that stayed
    NaN). Entry points report it like a SetupError; the message says what happened, what was
    saved and what to do."""


def exit_on_setup_error(function: Callable[[Any], Any], cfg: Any) -> Any:
    """Run an entry point's ``function(cfg)`` and return its result; a SetupError or
    TrainingStopped prints ``error: <message>`` to stderr and exits with status 1. SystemExit
    passes through Hydra's error handler, so the user sees the message alone, without a
    traceback."""
    try:
        return function(cfg)
    except (SetupError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def reported_as_setup_error(setting: str, *kinds: type[Exception]) -> Iterator[None]:
    """Turn the exceptions ``kinds`` raised inside into a SetupError ``"<setting>: <message>"``
    (e.g. ``setting="pretrained=weights/x.pth"``): what a user gave on the command line,
    reported in one line."""
    try:
        yield
    except kinds as err:
        raise SetupError(f"{setting}: {err}") from None
