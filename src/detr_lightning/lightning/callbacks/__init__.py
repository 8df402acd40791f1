"""Callbacks of a training run, one concern each."""

from .averaging import EMA, early_stopping, ema
from .history import MetricsHistory
from .memory import ReuseFreedMemory
from .preemption import SignalStop
from .progress import LossProgressBar
from .pruning import TrialPruning
from .step_checkpoint import StepCheckpoint
from .step_work import StepWork

__all__ = [
    "EMA",
    "LossProgressBar",
    "MetricsHistory",
    "ReuseFreedMemory",
    "SignalStop",
    "StepCheckpoint",
    "StepWork",
    "TrialPruning",
    "early_stopping",
    "ema",
]
