"""``detr-tune``: an Optuna study over training runs, with a search space of an
``hparams_search`` config and unpromising trials pruned after a validation.

``detr-tune hparams_search=<name> [training overrides] [tune.<key>=...]`` composes the training
config of each trial with Hydra's compose API (``conf/train.yaml``, the search config, the
overrides and the trial's values) and runs ``train(cfg)`` in this process, in
``<tune.sweep_dir>/<trial number>/``. The study lives in a storage (an SQLite file in the sweep
dir by default), so several processes, on one machine or as cluster jobs, can run trials of one
study. ``conf/tune.yaml`` lists the settings; docs/training.md describes the search.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..lightning.callbacks.pruning import TrialPruning
from ..utils.errors import SetupError
from ..utils.io import write_json_atomic
from .config import CONFIG_MODULE, compose_config
from .console import exit_on_setup_error
from .search_space import SearchParam, override_line, parse_param, search_space, suggest
from .sweeps import check_optimized_metric, objective
from .train import train

__all__ = ["main", "open_study", "tune"]

log = logging.getLogger(__name__)

BEST_TRIAL_FILE = "best_trial.json"
TRIAL_FILE = "trial.json"  # in each trial's run dir
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SetupError(
            "detr-tune needs Optuna 4 or newer: pip install 'detr-lightning[tune]'"
        ) from None
    return optuna


def _compose_search(search: str, overrides: Sequence[str]) -> DictConfig:
    """The training config of ``hparams_search=search`` with its ``hydra`` node."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose("train", [f"hparams_search={search}", *overrides],
                           return_hydra_config=True)  # fmt: skip
    except HydraException as err:
        raise SetupError(str(err)) from None


def _check_trial_config(cfg: DictConfig, space: Mapping[str, SearchParam]) -> None:
    """Refuse before the study what would fail every trial."""
    if cfg.get("optimized_metric") is None:
        raise SetupError("optimized_metric is null: name the metric to optimize, e.g. "
                         "optimized_metric=val/map")  # fmt: skip
    check_optimized_metric(cfg)
    choices = cfg.hydra.runtime.choices
    for name in space:
        if name not in choices and OmegaConf.select(cfg, name, default="?missing") == "?missing":
            raise SetupError(f"the searched key {name} is not in the training config (a typo? "
                             f"add it with +{name}=...)")  # fmt: skip
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if str(devices) != "1" or str(nodes) != "1":
        raise SetupError(
            f"trainer.devices={devices}, trainer.num_nodes={nodes}: detr-tune trains each trial "
            "in its own process on one device (trainer.devices=1); to use several GPUs, start "
            "one detr-tune per GPU (CUDA_VISIBLE_DEVICES=<i>) with the same tune.sweep_dir"
        )


def _storage(url: str, optuna: Any) -> Any:
    """An Optuna storage: ``journal:<file>`` or an SQLAlchemy URL (SQLite waits for locks)."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def _pruner(settings: DictConfig, optuna: Any) -> Any:
    spec = settings.pruner
    if isinstance(spec, DictConfig):
        return instantiate(spec)
    warmup = int(settings.warmup_validations)
    if spec == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(settings.startup_trials),
                                           n_warmup_steps=warmup)  # fmt: skip
    if spec == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(warmup, 1))
    if spec in ("none", None):
        return optuna.pruners.NopPruner()
    raise SetupError(f"tune.pruner={spec}: median, hyperband, none or {{_target_: <pruner>}}")


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_study(settings: DictConfig, sweeper: Mapping[str, Any], sweep_dir: Path) -> Any:
    """The study named by ``tune.study_name`` (or the search config's) in its storage,
    created or continued (``load_if_exists``), with the config's sampler and the pruner."""
    optuna = _optuna()
    pruner = _pruner(settings, optuna)  # a bad name fails before the storage is opened
    direction = sweeper.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise SetupError(f"hydra.sweeper.direction={direction}: maximize or minimize")
    url = settings.storage or sweeper.get("storage")
    url = url or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    sampler = sweeper.get("sampler")
    return optuna.create_study(
        storage=_storage(str(url), optuna),
        study_name=settings.study_name or sweeper.get("study_name") or "detr",
        direction=direction,
        sampler=instantiate(sampler) if sampler else None,
        pruner=pruner,
        load_if_exists=True,
    )


def _run_trial(trial: Any, search: str, fixed: list[str], space: Mapping[str, SearchParam],
               sweep_dir: Path) -> float:  # fmt: skip
    """One trial: its values suggested, its config composed, ``train`` in its run dir."""
    optuna = _optuna()
    values = {name: suggest(trial, param) for name, param in space.items()}
    run_dir = sweep_dir / str(trial.number)
    overrides = [*fixed, *(override_line(space[k].target, v) for k, v in values.items())]
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("overrides", overrides)
    cfg = compose_config("train", [f"hparams_search={search}", *overrides, f"run_dir={run_dir}"])
    metric = str(cfg.optimized_metric)
    pruning = TrialPruning(trial, monitor=f"val/{metric.split('/', 1)[1]}")
    record = {"number": trial.number, "params": values, "overrides": overrides, "metric": metric}
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        log.info("trial %d: %s", trial.number, " ".join(overrides[len(fixed) :]) or "(no params)")
        metrics = train(cfg, callbacks=[pruning])
        if pruning.pruned:
            record |= {"state": "PRUNED", "pruned_at_validation": pruning.pruned_at}
            raise optuna.TrialPruned(f"pruned after validation {pruning.pruned_at}")
        value = objective(cfg, metrics)
        record |= {"state": "COMPLETE", "value": value}
        return value
    except (Exception, SystemExit) as err:
        if "state" not in record:
            record |= {"state": "FAIL", "error": str(err)}
        raise
    finally:
        record.setdefault("state", "FAIL")
        record["reports"] = {str(step): value for step, value in pruning.reports.items()}
        write_json_atomic(run_dir / TRIAL_FILE, record)
        logging.getLogger().removeHandler(handler)
        handler.close()


def _summary(study: Any, sweep_dir: Path, metric: str) -> dict[str, Any]:
    optuna = _optuna()
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    summary: dict[str, Any] = {"study_name": study.study_name, "metric": metric,
                               "direction": study.direction.name.lower(),
                               "trials": dict(sorted(states.items()))}  # fmt: skip
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        summary |= {"number": best.number, "value": best.value, "params": best.params,
                    "run_dir": best.user_attrs.get("run_dir"),
                    "overrides": best.user_attrs.get("overrides", [])}  # fmt: skip
    write_json_atomic(sweep_dir / BEST_TRIAL_FILE, summary)
    return summary


def tune(search: str, train_overrides: Sequence[str] = (),
         tune_overrides: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Run ``tune.n_trials`` trials of the study; returns (and writes to
    ``<sweep_dir>/best_trial.json``) the study's best trial: ``number``, ``value``,
    ``params``, ``run_dir``, ``overrides`` (``detr-train <overrides>`` trains it again), and
    the count of trials by state."""
    settings = compose_config("tune", list(tune_overrides)).tune
    cfg = _compose_search(search, [o for o in train_overrides if not _is_sweep(o)])
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    space, fixed = search_space(sweeper.get("params") or {}, train_overrides)
    _check_trial_config(cfg, space)
    sweep_dir = Path(str(settings.sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, sweeper, sweep_dir)
    optuna = _optuna()
    callbacks = []
    if settings.total_trials is not None:
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(int(settings.total_trials), done))
    n_trials = settings.n_trials if settings.n_trials is not None else sweeper.get("n_trials")
    log.info("study %s (%s): %s trials, searching %s, run dirs in %s", study.study_name,
             _hide_password(str(settings.storage or sweeper.get("storage") or "sqlite")),
             n_trials, ", ".join(space) or "nothing", sweep_dir)  # fmt: skip
    study.optimize(lambda trial: _run_trial(trial, search, fixed, space, sweep_dir),
                   n_trials=n_trials, callbacks=callbacks)  # fmt: skip
    return _summary(study, sweep_dir, str(cfg.optimized_metric))


def _is_sweep(line: str) -> bool:
    target, _, expression = line.partition("=")
    return parse_param(target, expression) is not None


USAGE = """usage: detr-tune hparams_search=<name> [training overrides] [tune.<key>=<value> ...]
  e.g. detr-tune hparams_search=detr_optuna data.root=/data/coco trainer.max_epochs=50 \\
           tune.n_trials=40 tune.sweep_dir=multirun/tune/coco
  A sweep override searches its key (model.num_queries=choice(50,100)); conf/tune.yaml lists
  the tune.* settings (n_trials, total_trials, sweep_dir, storage, study_name, pruner)."""


def _run(arguments: Sequence[str]) -> dict[str, Any]:
    searches = [a.split("=", 1)[1] for a in arguments if a.startswith("hparams_search=")]
    if len(searches) != 1 or not searches[0]:
        raise SetupError(f"detr-tune needs one hparams_search=<name>\n{USAGE}")
    tune_overrides = [a for a in arguments if a.startswith("tune.")]
    train_overrides = [a for a in arguments if not a.startswith(("tune.", "hparams_search="))]
    summary = tune(searches[0], train_overrides, tune_overrides)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """``detr-tune``: run the study and print its best trial (also in best_trial.json)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help"):
        print(USAGE)
        return
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    exit_on_setup_error(_run, arguments)


if __name__ == "__main__":
    main()
