"""Hyper-parameter sweeps: the value a search optimizes, and the ``hparams_search`` configs.

``optimized_metric`` (conf/train.yaml) names one logged statistic of the final evaluation,
``val/<name>`` (``test/<name>`` with ``test_after_fit=true``), e.g. ``val/map``; ``detr-tune``
optimizes it, and ``train.py`` returns it for Hydra's sweepers.

An ``hparams_search=<name>`` config states a search space in the syntax of Hydra's Optuna
sweeper (``hydra/sweeper: optuna`` with ``direction``, ``params`` ...); ``detr-tune`` reads it
(:mod:`detr_lightning.cli.tune`). :func:`register_search_schema` stores that ``hydra/sweeper``
node, so the configs compose without the sweeper plugin, and :class:`RunWithDetrTune` (a Hydra
callback of the configs) stops ``detr-train`` from running them with a pointer to
``detr-tune``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..evaluation.evaluator import max_detections, metric_keys
from ..utils.errors import SetupError

log = logging.getLogger(__name__)

# hydra.sweeper of an hparams_search config: what detr-tune reads (the keys and defaults of
# Hydra's Optuna sweeper that it honours)
SEARCH_SCHEMA: dict[str, Any] = {
    "_target_": "detr_lightning.cli.tune",  # not a Hydra sweeper: run the search with detr-tune
    "direction": "maximize",  # or minimize
    "study_name": None,  # null: tune.study_name (detr)
    "storage": None,  # null: tune.storage (sqlite:///<sweep dir>/study.db)
    "n_trials": 20,  # trials of one detr-tune process (tune.n_trials overrides it)
    "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": None},
    "params": {},  # key: interval(...) | tag(log, interval(...)) | range(...) | choice(...)
}


def _final_split(cfg: DictConfig) -> str:
    """The prefix of the metrics ``train(cfg)`` returns: ``test`` after ``test_after_fit``."""
    return "test" if cfg.get("test_after_fit") else "val"


def _metric_names(cfg: DictConfig) -> list[str]:
    max_dets = max_detections(cfg.model.num_queries)[-1]
    return [f"{_final_split(cfg)}/{key}" for key in metric_keys(max_dets)]


def check_optimized_metric(cfg: DictConfig) -> None:
    """Refuse an ``optimized_metric`` that the final evaluation will not log (SetupError)."""
    name = cfg.get("optimized_metric")
    if name is None:
        return
    names = _metric_names(cfg)
    if name in names:
        return
    hint = ""
    if name.startswith("test/") and _final_split(cfg) == "val":
        hint = " (test/* metrics exist with test_after_fit=true)"
    elif name.startswith("val/") and _final_split(cfg) == "test":
        hint = " (with test_after_fit=true the final evaluation logs test/*)"
    raise SetupError(
        f"optimized_metric={name} is not a metric of the final evaluation{hint}; "
        f"choose one of: {', '.join(names)}"
    )


def objective(cfg: DictConfig, metrics: Mapping[str, Any] | None) -> float | None:
    """The value of ``cfg.optimized_metric`` in ``train(cfg)``'s result (None when unset).

    ``metrics`` holds the final evaluation without its prefix (``{"map": 0.42, ...}``).
    Raises ValueError when that evaluation did not run, so a sweeper records a failed trial
    instead of a made-up value.
    """
    name = cfg.get("optimized_metric")
    if name is None:
        return None
    check_optimized_metric(cfg)
    key = name.split("/", 1)[1]
    if not metrics or key not in metrics:
        raise ValueError(
            f"optimized_metric={name}: the run ended without a {_final_split(cfg)} evaluation "
            "(trainer.limit_val_batches=0, or check_val_every_n_epoch larger than max_epochs?)"
        )
    value = float(metrics[key])
    if math.isnan(value):
        log.warning("optimized_metric=%s is NaN (no ground truth in the split?)", name)
    return value


def register_search_schema() -> None:
    """Store :data:`SEARCH_SCHEMA` as ``hydra/sweeper/optuna`` in Hydra's config store
    (idempotent), the node that ``hparams_search`` configs select."""
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=SEARCH_SCHEMA)


class RunWithDetrTune(Callback):
    """Hydra callback of the ``hparams_search`` configs: ``detr-train`` (with or without
    ``-m``) exits with an error that points to ``detr-tune``, before any training."""

    def _refuse(self, config: DictConfig) -> None:
        choice = config.hydra.runtime.choices.get("hparams_search")
        sys.exit(
            f"error: hparams_search={choice} is a search space for detr-tune, which runs the "
            f"Optuna study (pip install 'detr-lightning[tune]'): detr-tune "
            f"hparams_search={choice} [training overrides] [tune.n_trials=N]; detr-train trains "
            "one configuration"
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config)


__all__ = [
    "SEARCH_SCHEMA",
    "RunWithDetrTune",
    "check_optimized_metric",
    "objective",
    "register_search_schema",
]
