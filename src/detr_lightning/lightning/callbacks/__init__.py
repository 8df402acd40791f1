"""Callbacks of a training run, one concern each."""

from .history import MetricsHistory
from .memory import ReuseFreedMemory
from .preemption import SignalStop
from .step_checkpoint import StepCheckpoint

__all__ = ["MetricsHistory", "ReuseFreedMemory", "SignalStop", "StepCheckpoint"]
