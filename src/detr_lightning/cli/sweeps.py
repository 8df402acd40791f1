"""Hyper-parameter sweeps: the value a sweeper optimizes, and the best trial's files.

``optimized_metric`` (conf/train.yaml) names one logged statistic of the final evaluation,
``val/<name>`` (``test/<name>`` with ``test_after_fit=true``), e.g. ``val/map``; the root
``train.py`` returns its value so that Hydra's sweepers (Optuna) can optimize it.
``SaveBestTrial`` is a Hydra callback that, after an Optuna sweep, writes the best trial's
overrides and config next to the sweeper's ``optimization_results.yaml``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..evaluation.evaluator import max_detections, metric_keys
from ..utils.errors import SetupError

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"  # written by hydra-optuna-sweeper
BEST_TRIAL_FILE = "best_trial.yaml"


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


def _trial_overrides(trial_dir: Path) -> dict[str, Any]:
    """``key -> value`` of a trial's command-line overrides (``.hydra/overrides.yaml``), with
    values parsed the way Hydra parses them (``0.001`` a float, ``8`` an int)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = OmegaConf.to_container(OmegaConf.load(trial_dir / ".hydra" / "overrides.yaml"))
    parsed = OverridesParser.create().parse_overrides([str(line) for line in lines])
    return {override.get_key_element(): override.value() for override in parsed}


def find_best_trial(sweep_dir: Path, best_params: Mapping[str, Any]) -> Path | None:
    """The trial directory (``<sweep_dir>/<n>``) whose overrides set every ``best_params``
    value, or None (e.g. the best trial ran in an earlier sweep of a stored study)."""
    candidates = sorted(
        (p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    for trial_dir in candidates:
        overrides = _trial_overrides(trial_dir)
        if all(k in overrides and overrides[k] == v for k, v in best_params.items()):
            return trial_dir
    return None


def save_best_trial(sweep_dir: Path) -> Path | None:
    """Write ``<sweep_dir>/best_trial.yaml`` from the sweeper's ``optimization_results.yaml``:
    ``trial_dir``, ``best_value``, ``best_params``, ``overrides`` (the trial's command line
    without ``hparams_search``) and ``config`` (its composed config, ``.hydra/config.yaml``).
    Returns the file, or None when there is nothing to write (no results file, a
    multi-objective study, or a best trial from another sweep)."""
    results_file = sweep_dir / RESULTS_FILE
    if not results_file.is_file():
        return None
    results = OmegaConf.to_container(OmegaConf.load(results_file))
    if "best_params" not in results:
        return None
    trial_dir = find_best_trial(sweep_dir, results["best_params"])
    if trial_dir is None:
        log.warning("no trial under %s has the best parameters of %s", sweep_dir, results_file)
        return None
    overrides = OmegaConf.to_container(OmegaConf.load(trial_dir / ".hydra" / "overrides.yaml"))
    best = {
        "trial_dir": str(trial_dir),
        "best_value": results["best_value"],
        "best_params": results["best_params"],
        # without the search itself: `python train.py <overrides>` trains this trial again
        "overrides": [o for o in overrides if not str(o).startswith("hparams_search=")],
        "config": OmegaConf.to_container(OmegaConf.load(trial_dir / ".hydra" / "config.yaml")),
    }
    path = sweep_dir / BEST_TRIAL_FILE
    OmegaConf.save(OmegaConf.create(best), path)
    log.info("best trial: %s (%s), written to %s", trial_dir, results["best_value"], path)
    return path


class SaveBestTrial(Callback):
    """Hydra callback: ``save_best_trial`` of the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        save_best_trial(Path(str(config.hydra.sweep.dir)))


__all__ = [
    "BEST_TRIAL_FILE",
    "RESULTS_FILE",
    "SaveBestTrial",
    "check_optimized_metric",
    "find_best_trial",
    "objective",
    "save_best_trial",
]
