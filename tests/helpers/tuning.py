"""A pruner for the detr-tune tests that prunes known trials, whatever their metric."""

from __future__ import annotations

from collections.abc import Iterable

import optuna


class PruneTrials(optuna.pruners.BasePruner):
    """Prunes the trials numbered ``numbers`` at their first report (for runs through
    ``tune.pruner={_target_: helpers.tuning.PruneTrials, numbers: [1]}``)."""

    def __init__(self, numbers: Iterable[int]) -> None:
        self.numbers = {int(n) for n in numbers}

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number in self.numbers
