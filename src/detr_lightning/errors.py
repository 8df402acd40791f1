"""Exceptions that the entry points report to the user as a message, not a traceback."""

from __future__ import annotations


class SetupError(Exception):
    """A problem with the user's setup found before any work starts.

    Entry points (train.py, eval.py) print its message alone, without a traceback, and exit with
    status 1; the message itself must say what is wrong and how to fix it.
    """
