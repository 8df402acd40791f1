"""Exceptions that the entry points report to the user as a message, not a traceback
(:func:`detr_lightning.cli.console.exit_on_setup_error`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class SetupError(Exception):
    """A problem with the user's setup found before any work starts.

    Entry points (train.py, eval.py) print its message alone, without a traceback, and exit with
    status 1; the message itself must say what is wrong and how to fix it.
    """


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class TrainingStopped(Exception):
    """A run that stopped on purpose for a reason the user must act on (e.g. a loss that stayed
    NaN). Entry points report it like a SetupError; the message says what happened, what was
    saved and what to do."""


@contextlib.contextmanager
def reported_as_setup_error(setting: str, *kinds: type[Exception]) -> Iterator[None]:
    """Turn the exceptions ``kinds`` raised inside into a SetupError ``"<setting>: <message>"``
    (e.g. ``setting="pretrained=weights/x.pth"``): what a user gave on the command line,
    reported in one line."""
    try:
        yield
    except kinds as err:
        raise SetupError(f"{setting}: {err}") from None
